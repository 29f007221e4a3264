"""Character LM helpers: vocabulary, batchify, windows, bits per character (SPEC §6)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _data_fixtures import write_ptb_char, write_text8
from sab.data import (CharVocab, DataError, batchify, bits_per_char, iter_windows,
                      load_char_corpus)


def test_vocab_sorted_deterministic():
    v = CharVocab.build(list("hello_world") + ["<eos>"])
    assert v.itos == ["<eos>", "_", "d", "e", "h", "l", "o", "r", "w"]
    assert CharVocab.build(reversed(list("hello_world") + ["<eos>"])).itos == v.itos
    ids = v.encode(["h", "e", "<eos>"])
    assert ids.dtype == torch.int64 and ids.tolist() == [4, 3, 0]
    assert v.decode(ids) == ["h", "e", "<eos>"]
    with pytest.raises(DataError, match="'z' is not in the training vocabulary"):
        v.encode(["z"])


def test_vocab_bytes_fast_path_matches():
    v = CharVocab.build(" abc")
    assert torch.equal(v.encode(b"ab c"), v.encode(list("ab c")))
    assert v.encode(b"ab c", torch.uint8).dtype == torch.uint8
    with pytest.raises(DataError, match="'z'"):
        v.encode(b"abz")


def test_batchify_alphabet_diagram():
    data = torch.arange(26)  # a..z
    b = batchify(data, 4)
    assert b.shape == (6, 4)  # (N, B); y and z dropped
    assert b[:, 0].tolist() == [0, 1, 2, 3, 4, 5] and b[:, 1].tolist() == [6, 7, 8, 9, 10, 11]
    assert b[0].tolist() == [0, 6, 12, 18]


def test_windows_shapes_and_shift():
    b = batchify(torch.arange(40), 4)  # (10, 4)
    wins = list(iter_windows(b, 4))
    assert [tuple(x.shape) for x, _ in wins] == [(4, 4), (4, 4), (1, 4)]  # last one shorter
    for x, y in wins:
        assert torch.equal(y, x + 1)  # the stream is arange: the target is the next token


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), bsz=st.integers(1, 12), seq_len=st.integers(1, 40))
def test_batchify_windows_round_trip(n, bsz, seq_len):
    stream = torch.randint(0, 50, (n,))
    if n < bsz:
        with pytest.raises(ValueError):
            batchify(stream, bsz)
        return
    b = batchify(stream, bsz)  # (N, B)
    rows = n // bsz
    assert b.shape == (rows, bsz)
    # columns read top to bottom, left to right, give back the stream (minus the tail)
    assert torch.equal(b.t().reshape(-1), stream[: rows * bsz])
    wins = list(iter_windows(b, seq_len))
    if rows == 1:
        assert wins == []
        return
    xs = torch.cat([x for x, _ in wins])  # (N-1, B)
    ys = torch.cat([y for _, y in wins])
    assert torch.equal(xs, b[:-1]) and torch.equal(ys, b[1:])
    assert all(x.shape[0] == seq_len for x, _ in wins[:-1])


def test_bits_per_char_hand_checked():
    assert bits_per_char(8 * math.log(2), 8) == pytest.approx(1.0)  # 1 nat = 1/ln 2 bits
    assert bits_per_char(10 * math.log(4), 10) == pytest.approx(2.0)  # uniform over 4 chars
    assert bits_per_char(3.0, 2) == pytest.approx(3.0 / (2 * 0.6931471805599453))
    with pytest.raises(ValueError):
        bits_per_char(1.0, 0)


def test_load_ptb_char_corpus(tmp_path):
    spec, _ = write_ptb_char(tmp_path)
    c = load_char_corpus("tinyptb", tmp_path, registry={"tinyptb": spec})
    train = "the_cat_sat_on_the_mat|a_dog_ran|N_<unk>_'s_co.|"  # '|': <eos>; <unk>: 5 chars
    assert c.train.numel() == len(train) and c.train.dtype == torch.int64
    assert "<eos>" in c.vocab.itos and c.vocab.itos == sorted(c.vocab.itos)
    assert c.vocab.decode(c.train[:4]) == ["t", "h", "e", "_"]
    assert c.vocab.decode(c.valid) == list("the_dog_sat") + ["<eos>"]


def test_load_text8_corpus(tmp_path):
    spec, data = write_text8(tmp_path)
    c = load_char_corpus("tinytext8", tmp_path, registry={"tinytext8": spec}, dtype=torch.uint8)
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (1800, 100, 100)
    assert len(c.vocab) == 27 and c.vocab.itos[0] == " "
    assert "".join(c.vocab.decode(torch.cat([c.train, c.valid, c.test]))) == data.decode()
    x, y = next(iter_windows(batchify(c.train, 3), 5))
    assert x.dtype == torch.int64 and x.shape == (5, 3)


def test_test_split_unknown_char_is_an_error(tmp_path):
    spec, data = write_text8(tmp_path, data=b"ab" * 950 + b"c" * 100)  # 'c' only in valid/test
    with pytest.raises(DataError, match="'c'"):
        load_char_corpus("tinytext8", tmp_path, registry={"tinytext8": spec})
