"""Parsers of the real file formats, written for `sab` (no torchvision) (SPEC §6, §10).

- IDX (MNIST, Fashion-MNIST, mnist5k): big-endian; magic 0x00000803 for images (3 dims),
  0x00000801 for labels (1 dim); gzip or uncompressed (recognised by content, not by name).
- CIFAR-10 python batches: pickled dicts with b'data' (N, 3072) uint8 (1024 red, 1024 green,
  1024 blue values, each plane row-major) and b'labels'; read from the .tar.gz members directly
  or from the extracted folder. Unpickling allows only the numpy globals an array needs.
- PTB characters: Mikolov's ptb.char.*.txt, one sentence per line, characters separated by
  spaces, `_` between words.
- text8: one line of lowercase a-z and spaces, 100,000,000 characters, no newline.

Every parser checks what it reads and raises BadFileError naming the file; none modifies it.
"""
from __future__ import annotations

import gzip
import io
import pickle
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import BadFileError, ChecksumError

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
GZIP_MAGIC = b"\x1f\x8b"


# ----------------------------------------------------------------------------- IDX

def read_raw_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped if it is a gzip file (recognised by its magic bytes)."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise BadFileError(f"{path}: empty file (0 bytes)")
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise BadFileError(f"{path}: corrupted or truncated gzip data ({e})") from e
    return data


def parse_idx(data: bytes, name: str = "<bytes>", magic: Optional[int] = None) -> torch.Tensor:
    """Decode one IDX file held in `data` into a uint8 tensor of the declared shape.

    `magic`, when given, must match (IDX_IMAGES_MAGIC or IDX_LABELS_MAGIC). The byte count must
    equal the header plus the product of the declared dimensions: a truncated or padded file is
    refused.
    """
    if len(data) < 4:
        raise BadFileError(f"{name}: truncated IDX file ({len(data)} bytes, no header)")
    (found,) = struct.unpack(">I", data[:4])
    if found >> 16 != 0 or (found >> 8) & 0xFF != 0x08:
        raise BadFileError(f"{name}: wrong magic number 0x{found:08x}: not an unsigned-byte IDX "
                           f"file (expected 0x{magic or IDX_IMAGES_MAGIC:08x})")
    if magic is not None and found != magic:
        raise BadFileError(f"{name}: wrong magic number 0x{found:08x}, expected 0x{magic:08x} "
                           f"({'images' if magic == IDX_IMAGES_MAGIC else 'labels'})")
    ndim = found & 0xFF
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise BadFileError(f"{name}: truncated IDX header ({len(data)} bytes, {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    want = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != want:
        raise BadFileError(
            f"{name}: IDX header declares shape {tuple(dims)} = {want} bytes, found {len(data)} "
            f"bytes ({'truncated' if len(data) < want else 'trailing bytes'})")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)
    return torch.from_numpy(arr.copy())


def read_idx(path: Path, magic: Optional[int] = None) -> torch.Tensor:
    """Read an IDX file, gzip or uncompressed; see `parse_idx`."""
    return parse_idx(read_raw_bytes(path), str(path), magic)


def read_idx_pair(images_path: Path, labels_path: Path,
                  num_classes: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, H, W) uint8 and labels (N,) int64 from an IDX pair, checked for agreement."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise BadFileError(f"{images_path} holds {images.shape[0]} images but {labels_path} "
                           f"holds {labels.shape[0]} labels")
    if labels.numel() and int(labels.max()) >= num_classes:
        raise BadFileError(f"{labels_path}: label {int(labels.max())} out of range "
                           f"0..{num_classes - 1}")
    return images, labels.long()


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array with 1 (labels) or 3 (images) dimensions."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">I", 0x00000800 | array.ndim) + struct.pack(f">{array.ndim}I",
                                                                      *array.shape)
    return header + array.tobytes()


# ----------------------------------------------------------------------------- CIFAR-10

class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, ints and numpy arrays; refuses any other global, so a file
    that is not a CIFAR batch cannot run code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 writes bytes at protocol 2 (torch allows it too)
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR batch")
        if module.startswith("numpy.core"):  # numpy >= 2 moved numpy.core to numpy._core
            module = "numpy._core" + module[len("numpy.core"):] if hasattr(np, "_core") else module
        return super().find_class(module, name)


def parse_cifar_batch(data: bytes, name: str = "<bytes>",
                      num_classes: int = 10) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) int64 from one pickled CIFAR-10 batch."""
    if not data:
        raise BadFileError(f"{name}: empty file (0 bytes)")
    try:
        d = _NumpyOnlyUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError...
        raise BadFileError(f"{name}: not a readable CIFAR-10 batch ({type(e).__name__}: {e})") \
            from e
    if not isinstance(d, dict) or b"data" not in d or b"labels" not in d:
        raise BadFileError(f"{name}: not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    x, y = d[b"data"], d[b"labels"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072:
        raise BadFileError(f"{name}: b'data' must be a uint8 array (N, 3072), found "
                           f"{getattr(x, 'dtype', type(x))} {getattr(x, 'shape', '')}")
    y = np.asarray(y, dtype=np.int64)
    if y.shape != (x.shape[0],):
        raise BadFileError(f"{name}: {x.shape[0]} images but {y.size} labels")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise BadFileError(f"{name}: labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(x.reshape(-1, 3, 32, 32).copy())  # (N, 3072) -> (N, C, H, W)
    return images, torch.from_numpy(y)


CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)


def _check_md5(data: bytes, name: str, md5s: Optional[Dict[str, str]], key: str) -> None:
    if md5s and md5s.get(key):
        import hashlib
        got = hashlib.md5(data).hexdigest()
        if got != md5s[key]:
            raise ChecksumError(f"{name}: md5 mismatch: expected {md5s[key]}, found {got}",
                                path=name, expected=md5s[key], found=got)


def read_cifar10_archive(path: Path, folder: str = "cifar-10-batches-py",
                         md5s: Optional[Dict[str, str]] = None
                         ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{'train', 'test'} -> (images (N, 3, 32, 32) uint8, labels (N,)) read from the members of
    cifar-10-python.tar.gz, without extracting; each member's md5 is checked against `md5s`."""
    path = Path(path)
    blobs: Dict[str, bytes] = {}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for batch in CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES:
                member = f"{folder}/{batch}"
                try:
                    f = tar.extractfile(member)
                except KeyError:
                    f = None
                if f is None:
                    raise BadFileError(f"{path}: member {member} not found in the archive")
                blobs[batch] = f.read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise BadFileError(f"{path}: corrupted or truncated tar.gz ({e})") from e
    for batch, data in blobs.items():
        _check_md5(data, f"{path}:{folder}/{batch}", md5s, batch)
    return _cifar_splits({b: parse_cifar_batch(d, f"{path}:{folder}/{b}")
                          for b, d in blobs.items()})


def read_cifar10_folder(folder: Path, md5s: Optional[Dict[str, str]] = None
                        ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """As `read_cifar10_archive`, from the extracted cifar-10-batches-py folder."""
    out = {}
    for batch in CIFAR10_TRAIN_BATCHES + CIFAR10_TEST_BATCHES:
        p = Path(folder) / batch
        data = p.read_bytes()
        _check_md5(data, str(p), md5s, batch)
        out[batch] = parse_cifar_batch(data, str(p))
    return _cifar_splits(out)


def _cifar_splits(batches) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    def cat(names):
        return (torch.cat([batches[n][0] for n in names]), torch.cat([batches[n][1] for n in names]))
    return {"train": cat(CIFAR10_TRAIN_BATCHES), "test": cat(CIFAR10_TEST_BATCHES)}


# ----------------------------------------------------------------------------- text

def read_ascii(path: Path) -> str:
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise BadFileError(f"{path}: empty file (0 bytes)")
    try:
        return data.decode("ascii")
    except UnicodeDecodeError as e:
        raise BadFileError(f"{path}: not ASCII text (byte 0x{data[e.start]:02x} at offset "
                           f"{e.start}): not a ptb.char file") from e


EOS = "<eos>"


def parse_ptb_char(text: str, eos: str = EOS) -> List[str]:
    """Tokens of a ptb.char file: each line's space-separated characters, then `eos`.

    Like the PyTorch word_language_model example (`line.split() + ['<eos>']`), every line ends
    with an end-of-line token, so the model also predicts where a sentence ends. Lines holding
    only whitespace carry no characters and add no token: Mikolov's files end with a line holding
    a single space (the conversion wrote a space after every character and after every newline),
    which is not a sentence.
    """
    tokens: List[str] = []
    for line in text.splitlines():
        chars = line.split()
        if chars:
            tokens.extend(chars)
            tokens.append(eos)
    return tokens


def read_ptb_char(path: Path, eos: str = EOS) -> List[str]:
    tokens = parse_ptb_char(read_ascii(path), eos)
    if not tokens:
        raise BadFileError(f"{path}: no characters in the file")
    return tokens


TEXT8_ALPHABET = b" abcdefghijklmnopqrstuvwxyz"


def check_text8(data: bytes, name: str) -> bytes:
    if not data:
        raise BadFileError(f"{name}: empty text8")
    stray = data.translate(None, TEXT8_ALPHABET)
    if stray:
        raise BadFileError(f"{name}: text8 holds only a-z and spaces; found byte "
                           f"0x{stray[0]:02x}")
    return data


def read_text8(path: Path, member: str = "text8") -> bytes:
    """The text8 characters as bytes, from text8.zip (member `text8`) or the extracted file."""
    path = Path(path)
    if path.suffix == ".zip":
        try:
            with zipfile.ZipFile(path) as z:
                data = z.read(member)
        except KeyError as e:
            raise BadFileError(f"{path}: no member {member!r} in the zip") from e
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise BadFileError(f"{path}: corrupted or truncated zip ({e})") from e
        return check_text8(data, f"{path}:{member}")
    return check_text8(path.read_bytes(), str(path))


def split_text8(data: bytes, sizes: Sequence[int] = (90_000_000, 5_000_000, 5_000_000)
                ) -> Dict[str, bytes]:
    """First 90M characters train, next 5M valid, last 5M test (SPEC §6). Smaller inputs (tests)
    are split in the same 90/5/5 proportion."""
    n = len(data)
    if n != sum(sizes):
        sizes = (n * 90 // 100, n * 5 // 100, n - n * 90 // 100 - n * 5 // 100)
    a, b, _ = sizes
    return {"train": data[:a], "valid": data[a:a + b], "test": data[a + b:]}
