"""`python -m streamgemma`: the `streamgemma` command, for environments without its script on PATH."""

import sys

from streamgemma.cli import main

if __name__ == "__main__":
    sys.exit(main())
