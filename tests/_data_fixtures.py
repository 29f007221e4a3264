"""Small fixtures in the formats of the real files, and registries that describe them.

Everything is generated into tmp dirs by the tests; nothing here touches the network or a real
data root.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np

from sab.data import encode_idx, ptb_words_to_chars
from sab.data.registry import DatasetSpec, FileSpec, Layout, Slot, _idx_slot

WORDS = {  # word-level PTB layout: a space before every word and before the newline
    "train": " the cat sat on the mat \n a dog ran \n N <unk> 's co. \n",
    "valid": " the dog sat \n",
    "test": " a cat ran on the mat \n the end \n",
}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def snapshot(path: Path) -> Tuple[bytes, int]:
    """What a test compares before and after: the bytes and the modification time."""
    return Path(path).read_bytes(), os.stat(path).st_mtime_ns


# ----------------------------------------------------------------------------- IDX

def idx_arrays(n_train: int = 6, n_test: int = 4, seed: int = 0) -> Dict[str, tuple]:
    rng = np.random.default_rng(seed)
    return {split: (rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8),
                    (np.arange(n) % 10).astype(np.uint8))
            for split, n in (("train", n_train), ("test", n_test))}


IDX_NAMES = {("train", 0): "train-images-idx3-ubyte", ("train", 1): "train-labels-idx1-ubyte",
             ("test", 0): "t10k-images-idx3-ubyte", ("test", 1): "t10k-labels-idx1-ubyte"}


def write_idx_dataset(root: Path, name: str = "tiny", gz: bool = True, arrays=None,
                      url_base: Optional[str] = None) -> Tuple[DatasetSpec, dict]:
    """Write an IDX dataset into root/name/ and return (its spec, the arrays)."""
    arrays = arrays or idx_arrays()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    slots = []
    for (split, which), fname in IDX_NAMES.items():
        raw = encode_idx(arrays[split][which])
        packed = gzip.compress(raw, mtime=0)
        (folder / (fname + ".gz" if gz else fname)).write_bytes(packed if gz else raw)
        key = f"{split}_{'images' if which == 0 else 'labels'}"
        slots.append(_idx_slot(key, name, fname, url_base, arrays[split][1].shape[0], which == 0,
                               len(packed), md5(packed), md5(raw)))
    return DatasetSpec(name, "fixture IDX", "idx", (Layout("IDX", tuple(slots)),)), arrays


# ----------------------------------------------------------------------------- CIFAR-10

CIFAR_BATCHES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch")


def cifar_batches(n: int = 2, seed: int = 0) -> Dict[str, bytes]:
    """Pickled batches shaped like CIFAR-10's (protocol 2, as the Python 2 originals)."""
    rng = np.random.default_rng(seed)
    out = {}
    for i, b in enumerate(CIFAR_BATCHES):
        d = {b"batch_label": b.encode(), b"labels": [(i + j) % 10 for j in range(n)],
             b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
             b"filenames": [f"img{j}.png".encode() for j in range(n)]}
        out[b] = pickle.dumps(d, protocol=2)
    out["batches.meta"] = pickle.dumps({b"label_names": [b"airplane"] * 10,
                                        b"num_cases_per_batch": n, b"num_vis": 3072}, protocol=2)
    return out


def write_cifar(root: Path, name: str = "tinycifar", archive: bool = True,
                url: Optional[str] = None) -> Tuple[DatasetSpec, Dict[str, bytes], Path]:
    blobs = cifar_batches()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for b, data in blobs.items():
                info = tarfile.TarInfo(f"cifar-10-batches-py/{b}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        path = folder / "cifar-10-python.tar.gz"
        path.write_bytes(buf.getvalue())
    else:
        (folder / "cifar-10-batches-py").mkdir(exist_ok=True)
        for b, data in blobs.items():
            (folder / "cifar-10-batches-py" / b).write_bytes(data)
        path = folder / "cifar-10-batches-py"
    arch_bytes = path.read_bytes() if archive else b""
    spec = DatasetSpec(name, "fixture CIFAR", "cifar10", (
        Layout("tar.gz", (Slot("archive", (FileSpec(
            f"{name}/cifar-10-python.tar.gz", url, len(arch_bytes) if archive else None,
            md5(arch_bytes) if archive else None),)),)),
        Layout("folder", tuple(Slot(b, (FileSpec(f"{name}/cifar-10-batches-py/{b}", None,
                                                  len(d), md5(d)),)) for b, d in blobs.items())),
    ))
    return spec, blobs, path


# ----------------------------------------------------------------------------- text

def write_ptb_char(root: Path, name: str = "tinyptb", url: Optional[str] = None
                   ) -> Tuple[DatasetSpec, Dict[str, bytes]]:
    texts = {s: ptb_words_to_chars(w).encode() for s, w in WORDS.items()}
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    for s, data in texts.items():
        (folder / f"ptb.char.{s}.txt").write_bytes(data)
    return ptb_spec(name, texts, url), texts


def ptb_spec(name: str, texts: Dict[str, bytes], url: Optional[str] = None) -> DatasetSpec:
    return DatasetSpec(name, "fixture PTB char", "ptb_char", (Layout("text", tuple(
        Slot(s, (FileSpec(f"{name}/ptb.char.{s}.txt", url, len(d), md5(d),
                          member=f"simple-examples/data/ptb.char.{s}.txt" if url else None),))
        for s, d in texts.items())),), prepare="fixture")


def text8_bytes(n: int = 2000, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return bytes(rng.choice(np.frombuffer(b" abcdefghijklmnopqrstuvwxyz", np.uint8), size=n))


def write_text8(root: Path, name: str = "tinytext8", zipped: bool = True,
                data: Optional[bytes] = None) -> Tuple[DatasetSpec, bytes]:
    data = data if data is not None else text8_bytes()
    folder = Path(root) / name
    folder.mkdir(parents=True, exist_ok=True)
    if zipped:
        with zipfile.ZipFile(folder / "text8.zip", "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("text8", data)
    else:
        (folder / "text8").write_bytes(data)
    zbytes = (folder / "text8.zip").read_bytes() if zipped else b""
    spec = DatasetSpec(name, "fixture text8", "text8", (Layout("zip or text", (Slot("text", (
        FileSpec(f"{name}/text8.zip", None, len(zbytes) if zipped else None,
                 sha256=hashlib.sha256(zbytes).hexdigest() if zipped else None),
        FileSpec(f"{name}/text8", None, len(data), sha256=hashlib.sha256(data).hexdigest()),
    )),)),), extra={"split": (len(data) * 90 // 100, len(data) * 5 // 100,
                              len(data) - len(data) * 95 // 100)})
    return spec, data
