"""Embedding `Session.step` in your own decoding loop: a constrained generator
that may only write digits, for instance to fill in a numeric field.

Runs in seconds on a CPU: it trains a small SentencePiece tokenizer and builds
a tiny random model (the digits it writes are meaningless; the loop is the
point). With a real checkpoint, replace `tiny_model()` by `streamgemma.load(path)`.
"""

import io
import random

import sentencepiece as spm
import torch

import streamgemma as sg


def tiny_model() -> sg.Model:
    rng = random.Random(0)
    words = "order number total amount is paid due on the invoice".split()
    corpus = [" ".join(rng.choice(words + [str(rng.randint(0, 9999))]) for _ in range(8)) for _ in range(500)]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=proto, vocab_size=290, model_type="bpe",
                                   byte_fallback=True, split_digits=True, minloglevel=2)
    tokenizer = sg.Tokenizer(proto.getvalue())
    config = sg.GriffinConfig.preset("tiny", vocab_size=320)
    return sg.Model.random(config, seed=0, device="cpu", dtype="float32", tokenizer=tokenizer)


def digits_only(session: sg.Session, prompt: str, max_digits: int = 6) -> str:
    """Continue `prompt` with at most `max_digits` digits, greedily, by masking
    every token that is not a digit before picking the next one."""
    tok = session.model.tokenizer
    allowed = torch.full((session.model.config.vocab_size,), -torch.inf)
    for i in range(tok.vocab_size):
        if tok.piece(i).lstrip("\u2581").isdigit():
            allowed[i] = 0.0
    logits = session.feed(prompt)
    detok = tok.detokenizer()
    text = ""
    for _ in range(max_digits):
        token = int(torch.argmax(logits + allowed).item())
        text += detok.push(token)
        logits = session.step(token)  # the choice becomes part of the session's state
    return text + detok.flush()


if __name__ == "__main__":
    model = tiny_model()
    with model.session() as session:
        number = digits_only(session, "the invoice number is")
        print(f"digits: {number!r} (position {session.position})")
        assert number.strip().isdigit()
        # The session goes on from there, e.g. with free text.
        rest = "".join(t.text for t in session.generate(max_tokens=8, seed=0))
        print(f"then: {rest!r}")
