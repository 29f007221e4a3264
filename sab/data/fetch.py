"""Download helper for machines with a network (SPEC §10; our own machines have none).

`fetch(name)` downloads each missing file of the dataset's canonical layout:
- into `<file>.part` next to its final place, resuming an earlier `.part` with an HTTP Range
  request when the server answers 206, restarting cleanly otherwise;
- then verifies size and checksum, and only then renames it into place (`os.replace`).
An interrupted download leaves only the `.part` file, which `check` and the loaders never read;
a download that fails verification is discarded. Existing files are never overwritten: a valid
one is kept, a bad one is reported and left untouched.
"""
from __future__ import annotations

import http.client
import os
import socket
import sys
import tarfile
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional
from urllib.parse import urlparse

from .errors import BadFileError, ChecksumError, DataError, DownloadError
from .integrity import _fsync_dir, atomic_write_bytes, inspect_dataset, verify_file
from .registry import FileSpec, PathLike, get_spec
from .registry import data_root as resolve_root

CHUNK = 1 << 16
USER_AGENT = "sab-data/0.1 (+https://github.com/; Sparse Attentive Backtracking)"


def _mirror(url: str, url_override: Optional[str]) -> str:
    """`url_override` is a mirror: a base URL to which the file's name is appended."""
    if not url_override:
        return url
    return url_override.rstrip("/") + "/" + PurePosixPath(urlparse(url).path).name


class _Progress:
    def __init__(self, enabled: Optional[bool], total: Optional[int], initial: int, desc: str):
        self.bar = None
        show = sys.stderr.isatty() if enabled is None else enabled
        if show:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, initial=initial, unit="B", unit_scale=True,
                                unit_divisor=1024, desc=desc, file=sys.stderr, leave=True)
            except ImportError:
                self.bar = None

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _verify_and_place(tmp: Path, dest: Path, spec, failure: str) -> None:
    """Verify ``tmp`` against ``spec`` (skipped when None) and move it to ``dest`` atomically; a
    file that fails is deleted (it is ours, half-made) and ``failure`` starts the error."""
    if spec is not None:
        try:
            verify_file(tmp, spec, "")
        except BadFileError as e:
            tmp.unlink()
            raise ChecksumError(f"{failure}: {e}", path=str(dest),
                                expected=getattr(e, "expected", ""),
                                found=getattr(e, "found", "")) from e
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)


def download(url: str, dest: Path, spec: Optional[FileSpec] = None, *,
             progress: Optional[bool] = None, timeout: float = 60.0,
             _restarted: bool = False) -> Path:
    """Download `url` to `dest` through `dest.part` (resumable), verify it against `spec`, then
    rename it into place. Raises DownloadError (interrupted; the .part stays for a resume) or
    ChecksumError (the download is discarded; the message holds both checksums)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have and not _restarted:  # the .part is not a prefix: start over
            part.unlink()
            return download(url, dest, spec, progress=progress, timeout=timeout, _restarted=True)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: cannot connect ({e}); no network? Put the file at {dest} "
                            f"by hand") from e
    with resp:
        length = resp.headers.get("Content-Length")
        length = int(length) if length is not None else None
        resumed = False
        if have and resp.status == 206:
            start = _content_range_start(resp.headers.get("Content-Range"))
            resumed = start == have
            if not resumed and not _restarted:  # a range we did not ask for: start over
                resp.close()
                part.unlink()
                return download(url, dest, spec, progress=progress, timeout=timeout,
                                _restarted=True)
        if not resumed:
            have = 0  # 200: the server sends the whole file; the old .part is replaced
        total = (have + length) if length is not None else None
        bar = _Progress(progress, total, have, dest.name)
        got = have
        try:
            with open(part, "ab" if resumed else "wb") as f:
                while True:
                    block = resp.read(CHUNK)
                    if not block:
                        break
                    f.write(block)
                    got += len(block)
                    bar.update(len(block))
                f.flush()
                os.fsync(f.fileno())
        except (http.client.HTTPException, OSError, socket.timeout) as e:
            raise DownloadError(f"{url}: download interrupted after {got} bytes ({e}); the part "
                                f"is kept in {part}: run fetch again to resume") from e
        finally:
            bar.close()
    if total is not None and got != total:
        raise DownloadError(f"{url}: download interrupted after {got} of {total} bytes; the part "
                            f"is kept in {part}: run fetch again to resume")
    _verify_and_place(part, dest, spec if spec is not None and spec.verifiable else None,
                      f"download of {url} failed verification and was discarded")
    return dest


def _content_range_start(value: Optional[str]) -> Optional[int]:
    # "bytes 100-999/1000"
    try:
        return int(value.split()[1].split("-")[0]) if value else None
    except (IndexError, ValueError):
        return None


def fetch(name: str, data_root: Optional[PathLike] = None, url_override: Optional[str] = None,
          *, registry=None, progress: Optional[bool] = None, timeout: float = 60.0,
          log: Callable[[str], None] = print) -> List[Path]:
    """Download the missing files of dataset `name` into the data root (see module doc).

    url_override: a mirror base URL; each file's name is appended to it. progress: None shows a
    tqdm bar when stderr is a terminal, True always, False never. Returns the dataset's files.
    """
    spec = get_spec(name, registry)
    root = resolve_root(data_root)
    status = inspect_dataset(spec, root)
    if status.state == "ok":
        log(f"{name}: already present and valid in {root}")
        return [f.path for f in status.files.values()]
    if status.state == "bad":
        raise BadFileError(f"{name}: not downloading over bad file(s), left untouched:\n"
                           f"{status.message}")
    if not spec.fetchable:
        raise DataError(f"{name} has no download; build it with `sab data prepare {name}`")
    present = {f.spec.path for f in status.present}
    archives: Dict[str, Path] = {}
    for slot in spec.layouts[0].slots:
        if any(fs.path in present for fs in slot.options):
            continue
        fs = slot.canonical
        if not fs.url:
            raise DataError(f"{name}: no URL recorded for {fs.name}; put it at {root / fs.path}")
        url = _mirror(fs.url, url_override)
        dest = root / fs.path
        if fs.member is None:
            log(f"{name}: downloading {url} -> {dest}")
            download(url, dest, fs, progress=progress, timeout=timeout)
            continue
        if url not in archives:  # one archive holds several members (PTB's simple-examples.tgz)
            arch = root / "downloads" / PurePosixPath(urlparse(url).path).name
            if not arch.exists():
                log(f"{name}: downloading {url} -> {arch}")
                download(url, arch, None, progress=progress, timeout=timeout)
            archives[url] = arch
        _extract_member(archives[url], fs, dest, name)
        log(f"{name}: extracted {fs.member} -> {dest}")
    final = inspect_dataset(spec, root)
    if final.state != "ok":
        raise DataError(f"{name}: still not complete after fetch:\n{final.message}")
    return [f.path for f in final.files.values()]


def _extract_member(archive: Path, fs: FileSpec, dest: Path, name: str) -> None:
    try:
        with tarfile.open(archive, "r:*") as tar:
            f = tar.extractfile(fs.member)  # type: ignore[arg-type]
            if f is None:
                raise BadFileError(f"{archive}: {fs.member} is not a regular file")
            data = f.read()
    except KeyError as e:
        raise BadFileError(f"{archive}: no member {fs.member}") from e
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise BadFileError(f"{archive}: corrupted or truncated archive ({e}); delete it and fetch "
                           f"again") from e
    tmp = dest.with_name(dest.name + ".part")
    atomic_write_bytes(tmp, data)
    _verify_and_place(tmp, dest, fs, f"{archive}:{fs.member} failed verification, nothing written")
