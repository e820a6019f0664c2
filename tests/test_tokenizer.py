"""The streaming detokenizer against SentencePiece's own decode, and the chat format."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from textfixtures import UNSEEN_TEXT, tokenizer, trained_tokenizer  # noqa: F401 (fixture)

import streamgemma as sg
from streamgemma.tokenizer import Detokenizer, gemma_model_prefix, gemma_turn

MULTIBYTE = ["café naïve über", "東京 日本語", "hello 😀 world 🎉", UNSEEN_TEXT, " leading space", "  two", "a\nb\n\nc"]


def stream(tok: sg.Tokenizer, ids: list[int]) -> list[str]:
    d = tok.detokenizer()
    return [d.push(i) for i in ids] + [d.flush()]


@pytest.mark.parametrize("gemma_like", [True, False])
@pytest.mark.parametrize("text", MULTIBYTE)
def test_streamed_text_equals_decode(text, gemma_like):
    tok = trained_tokenizer(gemma_like)
    ids = tok.encode(text, add_bos=True)
    assert "".join(stream(tok, ids)) == tok.decode(ids)
    if gemma_like:  # identity normalization: text survives the round trip, unseen characters via bytes
        assert tok.decode(ids) == text


def test_unseen_text_uses_byte_pieces_and_never_splits_a_character(tokenizer):
    ids = tokenizer.encode("🦀")
    assert [tokenizer.piece(i) for i in ids] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x80>"]
    assert stream(tokenizer, ids) == ["", "", "", "🦀", ""]


def test_invalid_bytes_become_one_replacement_character_each(tokenizer):
    byte = lambda b: tokenizer.piece_id(f"<0x{b:02X}>")  # noqa: E731
    hello = tokenizer.encode(" hello")
    ids = [byte(0xF0), byte(0x9F), byte(0x41)] + hello + [byte(0xE2)]
    parts = stream(tokenizer, ids)
    assert "".join(parts) == tokenizer.decode(ids) == "\ufffd\ufffdA hello\ufffd"
    assert parts[-1] == "\ufffd"  # the dangling byte is only given up at the end of the stream


@pytest.mark.parametrize("gemma_like,expected", [(True, " hello"), (False, "hello")])
def test_first_piece_leading_space_follows_sentencepiece(gemma_like, expected):
    tok = trained_tokenizer(gemma_like)
    word = tok.piece_id("\u2581hello")
    for ids in ([word], [tok.bos_id, word], [0, word]):
        assert "".join(stream(tok, ids)) == tok.decode(ids) == expected
    assert "".join(stream(tok, [word, word])) == tok.decode([word, word]) == expected + " hello"


def id_sequences(tok):
    special = [0, 1, 2, 3, tok.piece_id("<start_of_turn>"), tok.piece_id("\u2581")]
    utf8_bytes = [tok.piece_id(f"<0x{b:02X}>") for b in (0x41, 0x80, 0x9F, 0xA6, 0xC3, 0xE2, 0xF0, 0xFF)]
    return st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(special + utf8_bytes)),
                    max_size=24)


@pytest.mark.parametrize("gemma_like", [True, False])
def test_any_id_sequence_streams_to_decode(gemma_like):
    tok = trained_tokenizer(gemma_like)

    @settings(max_examples=300, deadline=None)
    @given(id_sequences(tok))
    def check(ids):
        assert "".join(stream(tok, ids)) == tok.decode(ids)
        assert tok.unfinished(ids) == stream(tok, ids)[-1]  # what the last flush adds, from the ids alone

    check()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_resume_continues_like_the_original(data):
    tok = trained_tokenizer(False)
    ids = data.draw(id_sequences(tok))
    cut = data.draw(st.integers(0, len(ids)))
    d = tok.detokenizer()
    head = "".join(d.push(i) for i in ids[:cut])
    resumed = Detokenizer.resume(tok, ids[:cut], bytes(d.pending), window=1024)
    tail = "".join(resumed.push(i) for i in ids[cut:]) + resumed.flush()
    assert head + tail == tok.decode(ids)


def test_unknown_ids_are_named(tokenizer):
    with pytest.raises(ValueError, match="token id 400 "):
        tokenizer.detokenizer().push(400)
    with pytest.raises(ValueError, match="token id -1 "):
        tokenizer.decode([5, -1])


def test_gemma_turns(tokenizer):
    assert gemma_turn("user", "hi") == "<start_of_turn>user\nhi<end_of_turn>\n"
    assert gemma_model_prefix() == "<start_of_turn>model\n"
    with pytest.raises(ValueError, match="'system'"):
        gemma_turn("system", "hi")
    ids = tokenizer.encode(gemma_turn("user", "hi"))
    assert ids[0] == tokenizer.piece_id("<start_of_turn>")  # one atomic piece, not spelled out
    assert tokenizer.piece_id("<end_of_turn>") in ids


def test_piece_kinds_are_sentencepieces_and_remembered(tokenizer):
    """`piece_kind` (the detokenizer's per-token path) answers what SentencePiece does."""
    from streamgemma.tokenizer import PIECE_BYTE, PIECE_CONTROL, PIECE_TEXT, PIECE_UNKNOWN

    sp = tokenizer.processor
    for i in range(tokenizer.vocab_size):
        kind, piece = tokenizer.piece_kind(i)
        assert piece == sp.IdToPiece(i)
        want = (PIECE_BYTE if sp.IsByte(i) else PIECE_CONTROL if sp.IsControl(i)
                else PIECE_UNKNOWN if sp.IsUnknown(i) else PIECE_TEXT)
        assert kind == want
    assert tokenizer.piece_kind(5) is tokenizer.piece_kind(5)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        tokenizer.piece_kind(tokenizer.vocab_size)
