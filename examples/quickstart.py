"""Quickstart: save a model in the Hugging Face layout, load it back through
`streamgemma.load`, and drive a session token by token.

With a real checkpoint, replace the first block by
`model = sg.load("path/to/recurrentgemma-2b")`. Until the bundled demo model
lands, this uses a tiny model with random weights, so its tokens are noise.
"""

import tempfile

import streamgemma as sg


def main() -> None:
    with tempfile.TemporaryDirectory() as checkpoint:
        sg.Model.random(sg.GriffinConfig.preset("tiny"), seed=0).save(checkpoint)
        model = sg.load(checkpoint)
        print(model)

        session = model.session()
        logits = session.feed([2, 17, 42, 99])  # a prompt, consumed in parallel
        for _ in range(16):  # greedy decoding, one token at a time
            token = int(logits.argmax())
            print(token, end=" ", flush=True)
            logits = session.step(token)
        print(f"\nposition {session.position}, state {model.pool.slot_bytes():,} bytes per session")


if __name__ == "__main__":
    main()
