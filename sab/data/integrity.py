"""Verifying files against the registry, finding a dataset's files, writing files atomically
(SPEC §10).

Rules kept everywhere:
- a file is used only after its size and checksum (where recorded) have been verified;
- a bad file is reported with the expected and the found values and is left untouched;
- a file we write appears under its final name only when complete (temporary file in the same
  folder, fsync, `os.replace`).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Dict, Iterator, List, Optional, Tuple

from .errors import BadFileError, ChecksumError, MissingFileError
from .registry import REGISTRY, DatasetSpec, FileSpec, Layout, Slot, get_spec
from .registry import data_root as resolve_root

CHUNK = 1 << 20


def digest_stream(stream: BinaryIO, algorithm: str = "md5") -> Tuple[str, int]:
    """Hex digest and byte count of everything left in `stream`."""
    h = hashlib.new(algorithm)
    n = 0
    for block in iter(lambda: stream.read(CHUNK), b""):
        h.update(block)
        n += len(block)
    return h.hexdigest(), n


def file_digest(path: Path, algorithm: str = "md5") -> str:
    with open(path, "rb") as f:
        return digest_stream(f, algorithm)[0]


def _expected(spec: FileSpec) -> Optional[Tuple[str, str]]:
    if spec.sha256:
        return "sha256", spec.sha256
    if spec.md5:
        return "md5", spec.md5
    return None


def _hint(name: Optional[str]) -> str:
    if name == "":
        return ""
    if not name:
        return " The file was left in place."
    spec = REGISTRY.get(name)
    ways = [f"`sab data {cmd} {name}`" for cmd, ok in
            (("fetch", spec is None or spec.fetchable), ("prepare", spec is None or spec.prepare))
            if ok]
    then = f", then run {' or '.join(ways)}" if ways else ", then put the right file there"
    return f" The file was left in place: move it away{then}."


def verify_file(path: Path, spec: FileSpec, dataset: Optional[str] = None) -> str:
    """Check the file at `path` against `spec`; return a short note on what was verified.

    Raises BadFileError (empty, corrupted gzip) or ChecksumError (size or checksum differ; the
    message holds both values). Never modifies the file. `dataset` names the dataset in the
    advice appended to errors ("" for no advice).
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise BadFileError(f"{path}: empty file (0 bytes).{_hint(dataset)}")
    if spec.size is not None and size != spec.size:
        what, want, got = "size", f"{spec.size} bytes", f"{size} bytes"
        problem = (f"{path}: wrong size: expected {want}, found {got} "
                   f"(truncated or a different file)")
    else:
        exp = _expected(spec)
        if exp is None:
            return "size ok, no checksum recorded" if spec.size is not None else "not verified"
        what, want = exp
        got = file_digest(path, what)
        if got == want:
            return f"{what} ok"
        problem = f"{path}: {what} mismatch: expected {want}, found {got}"
    # A recompressed .gz (e.g. Debian's Fashion-MNIST) is accepted when its content is right.
    if spec.content is not None and _expected(spec.content) is not None:
        try:
            return f"recompressed gzip, {_verify_gzip_content(path, spec.content)}"
        except BadFileError as e:
            problem += f"; and {e}"
    raise ChecksumError(problem + "." + _hint(dataset), path=str(path), expected=want, found=got)


def _verify_gzip_content(path: Path, content: FileSpec) -> str:
    algo, want = _expected(content)  # type: ignore[misc]
    try:
        with gzip.open(path, "rb") as f:
            got, n = digest_stream(f, algo)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise BadFileError(f"not a readable gzip file ({e}): corrupted or truncated") from e
    if content.size is not None and n != content.size:
        raise BadFileError(f"decompressed size: expected {content.size} bytes, found {n} bytes")
    if got != want:
        raise BadFileError(f"{algo} of the decompressed content: expected {want}, found {got}")
    return f"content {algo} ok"


def missing_message(root: Path, spec: DatasetSpec, slots: List[Slot]) -> str:
    lines = [f"dataset {spec.name}: missing file(s) in the data root {root}:"]
    for slot in slots:
        fs = slot.canonical
        lines.append(f"  {fs.name}: put it at {root / fs.path}")
        if fs.url:
            where = f"{fs.url} (member {fs.member})" if fs.member else fs.url
            lines.append(f"      canonical URL: {where}")
        for alt in slot.options[1:]:
            lines.append(f"      or, accepted as well: {root / alt.path}")
    if spec.prepare:
        lines.append(f"  build it with: sab data prepare {spec.name}   (from {spec.prepare})")
    if spec.fetchable:
        lines.append(f"  download it with: sab data fetch {spec.name}   (needs a network)")
    lines.append(f"  (data root: --data-dir, else $SAB_DATA, else ~/.cache/sab)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- inspection

@dataclass
class FileStatus:
    path: Path
    spec: FileSpec
    state: str  # "ok", "missing", "bad"
    detail: str = ""
    error: Optional[Exception] = None


@dataclass
class DatasetStatus:
    name: str
    state: str  # "ok", "missing", "bad"
    layout: Optional[str] = None
    files: Dict[str, FileStatus] = field(default_factory=dict)  # slot key -> file used
    present: List[FileStatus] = field(default_factory=list)  # every file found
    missing: List[Slot] = field(default_factory=list)  # slots of the nearest layout
    message: str = ""

    @property
    def bad(self) -> List[FileStatus]:
        return [f for f in self.present if f.state == "bad"]


def inspect_dataset(spec: DatasetSpec, root: Path, verify: bool = True) -> DatasetStatus:
    """Look at every file `spec` may use in `root`, verify those present, and say which layout
    (if any) is complete. Nothing is modified."""
    root = Path(root)
    seen: Dict[str, FileStatus] = {}
    for layout in spec.layouts:
        for slot in layout.slots:
            for fs in slot.options:
                if fs.path in seen:
                    continue
                p = root / fs.path
                if not p.is_file():
                    continue
                if not verify:
                    seen[fs.path] = FileStatus(p, fs, "ok", "present (not verified)")
                    continue
                try:
                    seen[fs.path] = FileStatus(p, fs, "ok", verify_file(p, fs, spec.name))
                except BadFileError as e:
                    seen[fs.path] = FileStatus(p, fs, "bad", str(e), e)
    status = DatasetStatus(spec.name, "missing", present=list(seen.values()))
    if status.bad:
        status.state = "bad"
        status.message = "\n".join(f.detail for f in status.bad)
        return status
    best: Optional[Tuple[int, Layout, List[Slot]]] = None
    for layout in spec.layouts:
        chosen: Dict[str, FileStatus] = {}
        absent: List[Slot] = []
        for slot in layout.slots:
            hit = next((seen[fs.path] for fs in slot.options if fs.path in seen), None)
            if hit is None:
                absent.append(slot)
            else:
                chosen[slot.key] = hit
        if not absent:
            status.state, status.layout, status.files = "ok", layout.name, chosen
            status.message = f"ok ({layout.name})"
            return status
        if best is None or len(chosen) > best[0]:
            best = (len(chosen), layout, absent)
    assert best is not None
    status.missing = best[2]
    status.message = missing_message(root, spec, best[2])
    return status


def locate(name: str, data_root: Optional[Path] = None, *, registry=None,
           verify: bool = True) -> Dict[str, Path]:
    """Paths of the verified files of dataset `name`, keyed by slot (e.g. "train_images").

    Raises MissingFileError (where to put what, from which URL) or BadFileError / ChecksumError
    naming the bad file; see SPEC §10.
    """
    spec = get_spec(name, registry)
    root = resolve_root(data_root)
    status = inspect_dataset(spec, root, verify=verify)
    if status.state == "bad":
        err = status.bad[0].error
        if len(status.bad) == 1 and isinstance(err, BadFileError):
            raise err
        raise BadFileError(f"dataset {name}: bad file(s):\n{status.message}")
    if status.state == "missing":
        raise MissingFileError(status.message)
    return {key: fst.path for key, fst in status.files.items()}


def layout_of(name: str, files: Dict[str, Path], registry=None) -> str:
    """Which layout a `locate` result belongs to (by its slot keys)."""
    spec = get_spec(name, registry)
    for layout in spec.layouts:
        if {s.key for s in layout.slots} == set(files):
            return layout.name
    raise ValueError(f"no layout of {name} has slots {sorted(files)}")


# ----------------------------------------------------------------------------- atomic writes

@contextmanager
def atomic_write(path: Path) -> Iterator[BinaryIO]:
    """Open a temporary file next to `path` for binary writing; on success fsync it and
    `os.replace` it onto `path`; on failure remove the temporary file. `path` never holds a
    partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)
