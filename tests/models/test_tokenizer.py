"""CLIP's byte-level BPE: the byte map, training by hand-worked example, encode/decode."""

import numpy as np
import pytest

from cljax.models._tokenizer import BOS, EOS, bytes_to_unicode, pre_tokenize
from cljax.models.clip import CLIPTokenizer, train_bpe


def test_byte_map_is_a_bijection_of_printable_characters():
    m = bytes_to_unicode()
    assert sorted(m) == list(range(256))
    assert len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord("a")] == "a" and m[ord(" ")] == "Ġ"  # GPT-2/CLIP's mapping of the space


def test_train_bpe_hand_worked():
    # Sennrich et al.'s example: low x5, lower x2, newest x6, widest x3. First merges:
    # (e, s) and (s, t</w>) both count 9, the tie goes to the smaller pair; then (es, t</w>)
    # counts 9; then (l, o) counts 7.
    text = " ".join(["low"] * 5 + ["lower"] * 2 + ["newest"] * 6 + ["widest"] * 3)
    merges = train_bpe([text], num_merges=3)
    assert merges == [("e", "s"), ("es", "t</w>"), ("l", "o")]
    # No pair repeats once every word is one symbol: training stops early.
    assert train_bpe(["ab ab"], num_merges=50) == [("a", "b</w>")]
    with pytest.raises(ValueError, match="num_merges"):
        train_bpe([text], num_merges=-1)


def _tokenizer(context_length=16):
    texts = ["a red circle on the left", "the digit 7", 'the number: "7".', "a blue square"] * 3
    return CLIPTokenizer.build(train_bpe(texts, num_merges=200), context_length=context_length)


def test_encode_decode_round_trip_and_framing():
    tok = _tokenizer()
    for text in ["A Red  circle", "the digit 7", 'the number: "7".', "ünïcödé blue", "x"]:
        ids = tok.encode(text)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        words = " ".join(pre_tokenize(text))  # CLIP decodes words separated by spaces
        dec = {c: b for b, c in bytes_to_unicode().items()}
        expected = bytes(dec[c] if c != " " else 32 for c in words).decode()
        assert tok.decode(ids) == expected
    # A word seen in training is one token; an unseen one falls back to smaller pieces.
    assert len(tok.encode("circle")) == 3
    assert len(tok.encode("zebra")) > 3


def test_batch_padding_truncation_and_eot_position():
    tok = _tokenizer(context_length=6)
    ids, mask = tok(["a red circle", "a red circle on the left of the blue square"])
    assert ids.shape == mask.shape == (2, 6) and ids.dtype == np.int32
    first = tok.encode("a red circle")
    np.testing.assert_array_equal(ids[0, : len(first)], first)
    assert (ids[0, len(first) :] == tok.eos_id).all() and mask[0].sum() == len(first)
    assert ids[1, -1] == tok.eos_id and mask[1].all()  # truncated, the end token kept
    # BOS and EOS are the two highest ids, so the first argmax of a row is its end token.
    assert tok.vocab[EOS] == tok.vocab_size - 1 and tok.vocab[BOS] == tok.vocab_size - 2
    np.testing.assert_array_equal(np.argmax(ids, axis=1), [len(first) - 1, 5])


def test_save_and_load(tmp_path):
    tok = _tokenizer()
    tok.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(tmp_path)
    assert back.vocab == tok.vocab and back.merges == tok.merges
    assert back.context_length == tok.context_length
    np.testing.assert_array_equal(back(["a red circle"])[0], tok(["a red circle"])[0])
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="two symbols"):
        CLIPTokenizer.from_pretrained(tmp_path)
