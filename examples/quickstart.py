"""Quickstart: load the bundled demo model, stream a continuation, then drive
the same session token by token with your own (greedy) loop.

The demo model is small and was trained on the Python documentation, so it
writes documentation-flavoured English. With a real checkpoint pass its path,
or a Hugging Face Hub id: `sg.load("google/recurrentgemma-2b-it")`
(docs/loading.md).
"""

import streamgemma as sg


def main() -> None:
    model = sg.load("demo")
    print(model)

    with model.session(seed=0) as session:
        session.feed("The json module")  # the prompt, read in parallel
        for token in session.generate(max_tokens=40, temperature=0.7, top_p=0.95, stop=["\n\n"]):
            print(token.text, end="", flush=True)
        print()

        logits = session.feed(" For example,")
        ids = []
        for _ in range(20):  # greedy decoding, one token at a time
            ids.append(int(logits.argmax()))
            logits = session.step(ids[-1])
        print("greedy:", model.tokenizer.decode(ids))
        print(f"position {session.position}, state {session.state_bytes():,} bytes per session")


if __name__ == "__main__":
    main()
