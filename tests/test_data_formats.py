"""Parsers on small fixtures in the real formats; bad files give clear errors and stay untouched."""
import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from _data_fixtures import (WORDS, cifar_batches, snapshot, text8_bytes, write_cifar,
                            write_idx_dataset, write_text8)
from sab.data import (BadFileError, encode_idx, images_to_sequences, parse_ptb_char,
                      ptb_words_to_chars, read_cifar10_archive, read_cifar10_folder, read_idx,
                      read_idx_pair, read_ptb_char, read_text8, split_text8)
from sab.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, parse_cifar_batch


# ----------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_pair_exact(tmp_path, gz):
    _, arrays = write_idx_dataset(tmp_path, gz=gz)
    suffix = ".gz" if gz else ""
    images, labels = read_idx_pair(tmp_path / "tiny" / f"train-images-idx3-ubyte{suffix}",
                                   tmp_path / "tiny" / f"train-labels-idx1-ubyte{suffix}")
    assert images.shape == (6, 28, 28) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert torch.equal(images, torch.from_numpy(arrays["train"][0]))


def test_idx_header_layout():
    data = encode_idx(np.zeros((2, 28, 28), np.uint8))
    assert data[:4] == b"\x00\x00\x08\x03" and struct.unpack(">3I", data[4:16]) == (2, 28, 28)
    assert encode_idx(np.zeros(3, np.uint8))[:8] == b"\x00\x00\x08\x01\x00\x00\x00\x03"


def _bad_idx_cases(tmp_path):
    good = encode_idx(np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28) % 251)
    return {
        "truncated": (good[:-10], "truncated"),
        "truncated_gz": (gzip.compress(good, mtime=0)[:-20], "gzip"),
        "wrong_magic": (b"\x00\x00\x08\x02" + good[4:], "magic"),
        "not_idx": (b"<html>hello</html>" + good, "magic"),
        "empty": (b"", "empty"),
        "header_only": (good[:10], "header"),
        "trailing": (good + b"\x00", "trailing"),
    }


@pytest.mark.parametrize("case", ["truncated", "truncated_gz", "wrong_magic", "not_idx", "empty",
                                  "header_only", "trailing"])
def test_idx_bad_files_clear_error_untouched(tmp_path, case):
    data, words = _bad_idx_cases(tmp_path)[case]
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(data)
    before = snapshot(p)
    with pytest.raises(BadFileError) as e:
        read_idx(p, IDX_IMAGES_MAGIC)
    assert str(p) in str(e.value) and words in str(e.value)
    assert snapshot(p) == before


def test_idx_labels_given_for_images(tmp_path):
    p = tmp_path / "x"
    p.write_bytes(encode_idx(np.zeros(4, np.uint8)))
    with pytest.raises(BadFileError, match="expected 0x00000803"):
        read_idx(p, IDX_IMAGES_MAGIC)
    assert read_idx(p, IDX_LABELS_MAGIC).shape == (4,)


def test_idx_pair_count_mismatch(tmp_path):
    (tmp_path / "i").write_bytes(encode_idx(np.zeros((3, 28, 28), np.uint8)))
    (tmp_path / "l").write_bytes(encode_idx(np.zeros(2, np.uint8)))
    with pytest.raises(BadFileError, match="3 images but .* 2 labels"):
        read_idx_pair(tmp_path / "i", tmp_path / "l")


# ----------------------------------------------------------------------------- CIFAR-10

@pytest.mark.parametrize("archive", [True, False])
def test_cifar_archive_and_folder(tmp_path, archive):
    _, blobs, path = write_cifar(tmp_path, archive=archive)
    splits = read_cifar10_archive(path) if archive else read_cifar10_folder(path)
    x, y = splits["train"]
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.uint8
    assert y.dtype == torch.int64 and y.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    xt, yt = splits["test"]
    assert xt.shape == (2, 3, 32, 32) and yt.tolist() == [5, 6]
    raw = pickle.loads(blobs["data_batch_1"], encoding="bytes")[b"data"]  # (2, 3072)
    # b'data' rows: 1024 red, 1024 green, 1024 blue values, each plane row-major
    assert x[0, 1, 2, 3] == raw[0, 1024 + 2 * 32 + 3]
    seq = images_to_sequences(x)  # (N, 1024, 3): step = row-major pixel, channels RGB
    assert seq.shape == (10, 1024, 3)
    t = 5 * 32 + 7
    assert seq[1, t].tolist() == [raw[1, t], raw[1, 1024 + t], raw[1, 2048 + t]]


def test_cifar_checks_member_md5(tmp_path):
    _, blobs, path = write_cifar(tmp_path)
    with pytest.raises(BadFileError, match="md5 mismatch: expected 0+, found"):
        read_cifar10_archive(path, md5s={"data_batch_3": "0" * 32})


def test_cifar_truncated_archive_untouched(tmp_path):
    _, _, path = write_cifar(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    before = snapshot(path)
    with pytest.raises(BadFileError, match="corrupted or truncated"):
        read_cifar10_archive(path)
    assert snapshot(path) == before


def test_cifar_pickle_with_foreign_global_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    with pytest.raises(BadFileError, match="not allowed"):
        parse_cifar_batch(pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2), "evil")


@pytest.mark.parametrize("data,words", [
    (b"", "empty"), (pickle.dumps({b"data": 1}, protocol=2), "not a CIFAR-10 batch"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}), "(N, 3072)"),
    (cifar_batches()["data_batch_1"][:-30], "not a readable"),
])
def test_cifar_bad_batches(data, words):
    with pytest.raises(BadFileError) as e:
        parse_cifar_batch(data, "batch")
    assert words in str(e.value)


# ----------------------------------------------------------------------------- PTB char

def test_ptb_words_to_chars_layout():
    text = ptb_words_to_chars(" aer banknote \n pierre <unk> N \n")
    # Mikolov's layout: every character and every newline followed by one space
    assert text == "a e r _ b a n k n o t e \n p i e r r e _ < u n k > _ N \n "
    lines = text.split("\n")
    assert lines[0] == "a e r _ b a n k n o t e " and lines[1].startswith(" p ")
    assert lines[-1] == " "


def test_parse_ptb_char_tokens_and_eos(tmp_path):
    p = tmp_path / "ptb.char.valid.txt"
    p.write_text(ptb_words_to_chars(WORDS["train"]))
    toks = read_ptb_char(p)
    first = list("the_cat_sat_on_the_mat") + ["<eos>"]
    assert toks[:len(first)] == first
    assert toks.count("<eos>") == 3  # one per sentence; the final " " line adds nothing
    assert toks[-1] == "<eos>" and "<" in toks and "'" in toks


def test_parse_ptb_char_whitespace_lines():
    assert parse_ptb_char("a b \n \n c \n ") == ["a", "b", "<eos>", "c", "<eos>"]


@pytest.mark.parametrize("data,words", [(b"", "empty"), (b"a b \xff c\n", "not ASCII"),
                                        (b" \n \n ", "no characters")])
def test_ptb_char_bad_files_untouched(tmp_path, data, words):
    p = tmp_path / "ptb.char.train.txt"
    p.write_bytes(data)
    before = snapshot(p)
    with pytest.raises(BadFileError, match=words):
        read_ptb_char(p)
    assert snapshot(p) == before


# ----------------------------------------------------------------------------- text8

@pytest.mark.parametrize("zipped", [True, False])
def test_text8_read_and_split(tmp_path, zipped):
    _, data = write_text8(tmp_path, zipped=zipped)
    path = tmp_path / "tinytext8" / ("text8.zip" if zipped else "text8")
    assert read_text8(path) == data
    parts = split_text8(data)
    assert [len(parts[s]) for s in ("train", "valid", "test")] == [1800, 100, 100]
    assert parts["train"] + parts["valid"] + parts["test"] == data


def test_text8_split_real_sizes():
    parts = split_text8(b"a" * 100, sizes=(90, 5, 5))
    assert [len(v) for v in parts.values()] == [90, 5, 5]


@pytest.mark.parametrize("kind", ["bad_char", "corrupt_zip", "empty"])
def test_text8_bad_files_untouched(tmp_path, kind):
    if kind == "bad_char":
        write_text8(tmp_path, zipped=True, data=text8_bytes(100) + b"A")
        p = tmp_path / "tinytext8" / "text8.zip"
        words = "0x41"
    elif kind == "corrupt_zip":
        write_text8(tmp_path, zipped=True)
        p = tmp_path / "tinytext8" / "text8.zip"
        p.write_bytes(p.read_bytes()[:50])
        words = "corrupted or truncated zip"
    else:
        p = tmp_path / "text8"
        p.write_bytes(b"")
        words = "empty"
    before = snapshot(p)
    with pytest.raises(BadFileError, match=words):
        read_text8(p)
    assert snapshot(p) == before
