"""Incremental detokenization equals decoding the whole output, multi-byte characters included."""

import pytest

from kvcache.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["Hello world", "naïve café, Straße, 東京タワー 🙂🚀 done", " spaces   and\nnewlines\t", "12345 + 678 = 7023"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(smollm, text):
    tok = smollm.tokenizer
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    released = "".join(detok.add(t) for t in ids)
    assert released == detok.text
    assert detok.final_text() == tok.decode(ids)
    assert "\ufffd" not in detok.text


def test_partial_character_is_held_back(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("🙂")
    assert len(ids) > 1  # byte-level BPE splits the emoji across tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.add(t) for t in ids][:-1] == [""] * (len(ids) - 1)
    assert detok.text == "🙂"
