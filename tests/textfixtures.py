"""Text fixtures: SentencePiece models trained here on a small generated
corpus (byte fallback on, Gemma's chat symbols), and tiny random models that
carry them."""

from __future__ import annotations

import functools
import io
import random

import pytest

import streamgemma as sg

TOKENIZER_PIECES = 400
MODEL_VOCAB = 512  # larger than the tokenizer, as spare embedding rows happen in real checkpoints

WORDS = ("the quick brown fox jumps over lazy dog hello world stream gemma token session state "
         "café naïve über façade 東京 日本語 😀 🎉 ÿ 123 4567 . , ! ?").split()

# Text the tokenizer never saw, so it needs byte-fallback pieces.
UNSEEN_TEXT = "Ωmega ✓ 🦀 crab, Привет мир, 👩‍👩‍👧 family, ½ 𝄞 clef"


def corpus(lines: int = 2000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(lines)]


@functools.cache
def trained_tokenizer(gemma_like: bool = True) -> sg.Tokenizer:
    """A SentencePiece BPE model with Gemma's special ids (pad 0, eos 1, bos 2,
    unk 3) and chat symbols. gemma_like: no dummy prefix and no whitespace
    normalization, as Gemma's tokenizer; False: SentencePiece's defaults for
    those, so the first piece's leading space is stripped on decode."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()), model_writer=out, vocab_size=TOKENIZER_PIECES, model_type="bpe",
        byte_fallback=True, user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=0.99,
        normalization_rule_name="identity" if gemma_like else "nmt_nfkc",
        add_dummy_prefix=not gemma_like, remove_extra_whitespaces=not gemma_like,
        split_digits=True, allow_whitespace_only_pieces=True, minloglevel=2)
    return sg.Tokenizer(out.getvalue(), source="trained-in-test")


def text_model(seed: int = 0) -> sg.Model:
    """A tiny float32 CPU model whose vocabulary covers the trained tokenizer."""
    config = sg.GriffinConfig.preset("tiny", vocab_size=MODEL_VOCAB)
    return sg.Model.random(config, seed=seed, device="cpu", dtype="float32", tokenizer=trained_tokenizer())


@pytest.fixture
def tokenizer() -> sg.Tokenizer:
    return trained_tokenizer()


@pytest.fixture
def model() -> sg.Model:
    return text_model()


@pytest.fixture
def saved_model_dir(tmp_path):
    """A tiny model with a tokenizer, saved in the Hugging Face layout."""
    path = tmp_path / "tiny-model"
    text_model().save(path)
    return path
