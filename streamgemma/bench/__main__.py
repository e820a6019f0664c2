import sys

from streamgemma.bench import failed, main

if __name__ == "__main__":
    sys.exit(1 if failed(main()) else 0)
