"""C++ for the hot loops: the one-node layer's steps (``sab.fused``) and the MLP ranking.

A SAB time step dispatches about 200 tensor operations, and called from Python each costs
1–3 µs more than the same call from C++ (``python -m benchmarks.dispatch``): at T=100 up to a
third of the step.  ``csrc/fused_steps.cpp`` holds the step's pieces — the LSTM step and its
backward (the same ATen calls, in the same order, as the Python they replace: the same numbers
bit for bit; the pointwise backward as one pass that rounds the same), and a read (sparse:
ranking, gather, threshold, summary; or dense: softmax over every memory) and its backward with
the credit to the chunk's memories, written as loops over the batch rows (their ~15 and ~30 ATen
operations on a few hundred elements each cost more in ATen's per-operation overhead than in
arithmetic): equal to the Python steps to rounding, with the same memories selected
(``tests/test_native.py``).  Every path that reads through them — training, evaluation, the
sparse engine's forward and its recomputations — runs the same code.  The loop over time, the
memory bank's bookkeeping and the autograd routing stay in Python.  Built with ``-fopenmp``
where PyTorch uses OpenMP, the loops over the batch are threaded as PyTorch's operations are.

It also holds the MLP scorer's ranking kernel (``rational_scores``, used by
``sab.scorer.MLPScorer.rank`` on every path, so that every path selects the same memories):
one pass over the bank's cached keys instead of three ATen passes, the dominant cost at long
T.  It sums in its own order, so without it (the fallback) scores differ in rounding.

The source is compiled with ``torch.utils.cpp_extension`` the first time a process needs it
(about a minute, with the C++ compiler PyTorch finds, vectorised for the instruction set
PyTorch detects on this CPU) into ``~/.cache/sab/`` (``SAB_NATIVE_DIR``), one build per source,
torch version and instruction set, reused afterwards.  Without a compiler, or with
``SAB_NATIVE=0``, :func:`kernels` returns ``None``: ``sab.fused`` runs its Python steps and the
scorer ranks with ATen operations — the same results to rounding, slower.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

__all__ = ["kernels", "enabled", "describe"]

SOURCE = Path(__file__).with_name("csrc") / "fused_steps.cpp"
_ON = os.environ.get("SAB_NATIVE", "1") != "0"
_STALE_LOCK_S = 600  # a build takes about a minute; a lock this old belongs to a dead one
_STATE = {"module": None, "tried": False, "steps": _ON, "ranking": _ON}

# compiler flags per instruction set PyTorch detects (torch.backends.cpu.get_cpu_capability):
# the ranking kernel's loop is vectorised for it; the build directory is per instruction set
_ISA_FLAGS = {"AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512dq", "-mavx512vl",
                         "-mavx512bw"],
              "AVX2": ["-mavx2", "-mfma"]}


def _capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except Exception:  # older torch
        return "DEFAULT"


def _openmp_flags() -> list:
    """``-fopenmp`` where PyTorch runs its threads on OpenMP (its Linux builds): ATen's
    ``at::parallel_for`` in the kernels is then threaded like PyTorch's own operations (compiled
    without it, it runs serially).  Not linked: the OpenMP runtime is the one libtorch loads."""
    linux_omp = sys.platform.startswith("linux") and torch.backends.openmp.is_available()
    return ["-fopenmp"] if linux_omp else []


def _flags(openmp: bool = True) -> list:
    # -ffp-contract=off: no fused multiply-adds, every operation rounded on its own as ATen's
    # (the fused LSTM backward is bit-identical to the ATen operations it replaces)
    return (["-O3", "-fopenmp-simd", "-ffp-contract=off"] + _ISA_FLAGS.get(_capability(), [])
            + (_openmp_flags() if openmp else []))


def _build_dir(openmp: bool = True) -> Path:
    flags = " ".join(_flags(openmp)).encode()
    digest = hashlib.sha256(SOURCE.read_bytes() + flags).hexdigest()[:12]
    root = Path(os.environ.get("SAB_NATIVE_DIR", Path.home() / ".cache" / "sab"))
    return root / f"native-{torch.__version__}-{_capability()}-{digest}"


def _load(openmp: bool = True):
    from torch.utils.cpp_extension import load

    if shutil.which("ninja") is None:  # the PyPI package (a dependency) installs it beside Python
        try:
            import ninja
            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass  # load() then says that ninja is missing
    build = _build_dir(openmp)
    try:
        build.mkdir(parents=True, exist_ok=True)
    except OSError:  # no writable home: a directory of this user's under the temporary one
        user = os.getuid() if hasattr(os, "getuid") else "user"
        build = Path(tempfile.gettempdir()) / f"sab-{user}" / build.name
        build.mkdir(parents=True, exist_ok=True)
    lock = build / "lock"  # torch's build lock: left behind by a build that was killed, it
    if lock.exists() and time.time() - lock.stat().st_mtime > _STALE_LOCK_S:  # blocks forever
        warnings.warn(f"sab: removing a stale build lock {lock} (a build was interrupted)")
        lock.unlink(missing_ok=True)
    if not any(build.glob("*.so")):
        print(f"sab: compiling the C++ step functions (once, about a minute) into {build}",
              file=sys.stderr, flush=True)
    return load("sab_fused_steps", [str(SOURCE)], extra_cflags=_flags(openmp),
                build_directory=str(build), verbose=False)


def _error_line(e: Exception) -> str:
    """The line of a failed build that says why: the compiler's ``: error`` line if any."""
    lines = str(e).strip().splitlines() or [type(e).__name__]
    return next((x for x in lines if ": error" in x.lower()),
                next((x for x in lines if "error" in x.lower()), lines[-1])).strip()


def kernels(part: str = "steps"):
    """The compiled module, or ``None`` where ``part`` (``"steps"``: the one-node layer's step
    functions; ``"ranking"``: the ranking kernel) is switched off, or where it could not be
    built (a warning says why, once per process)."""
    if not _STATE[part]:
        return None
    if not _STATE["tried"]:
        _STATE["tried"] = True
        try:
            _STATE["module"] = _load()
        except Exception as e:  # no compiler, headers missing, ...: the Python steps still run
            if _openmp_flags():  # a compiler without OpenMP: build without it
                try:
                    _STATE["module"] = _load(False)
                    warnings.warn(f"sab: the C++ step functions built without -fopenmp "
                                  f"({_error_line(e)}): their loops over the batch run on one "
                                  "thread")
                except Exception:
                    pass
            if _STATE["module"] is None:
                warnings.warn(f"sab: the C++ step functions did not build ({_error_line(e)}); "
                              "sab.fused runs its Python steps and the scorer ranks with ATen "
                              "operations (the same results to rounding, slower)")
    return _STATE["module"]


def describe() -> str:
    """Which steps run now, for a benchmark's header: ``"C++ steps"`` (sab.native's), or
    ``"Python steps"`` and why (switched off, e.g. by ``SAB_NATIVE=0``, or not built)."""
    if not _STATE["steps"]:
        return "Python steps (sab.native off)"
    return "C++ steps (sab.native)" if kernels() is not None else "Python steps (not built)"


@contextlib.contextmanager
def enabled(steps: Optional[bool] = None, ranking: Optional[bool] = None) -> Iterator[None]:
    """Within the block, use the C++ step functions or not (``steps``), and the ranking kernel
    or not (``ranking``) — where they build; ``None`` leaves a setting as it is."""
    before = dict(_STATE)
    for part, on in (("steps", steps), ("ranking", ranking)):
        if on is not None:
            _STATE[part] = on
    try:
        yield
    finally:
        _STATE["steps"], _STATE["ranking"] = before["steps"], before["ranking"]

