"""`check`: which datasets are present and valid, missing, or bad (SPEC §10)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional

from .integrity import DatasetStatus, FileStatus, inspect_dataset
from .registry import REGISTRY, PathLike
from .registry import data_root as resolve_root


@dataclass
class CheckReport:
    root: Path
    datasets: List[DatasetStatus]

    @property
    def ok(self) -> bool:
        """No bad file (missing datasets are fine: they are just not installed)."""
        return not self.bad_files

    @property
    def bad_files(self) -> List[FileStatus]:
        return [f for d in self.datasets for f in d.bad]

    def status(self, name: str) -> DatasetStatus:
        return next(d for d in self.datasets if d.name == name)

    def table(self) -> str:
        """A printable table: one row per dataset, then the details of what is wrong."""
        rows = [("dataset", "status", "detail")]
        for d in self.datasets:
            if d.state == "ok":
                detail = f"{d.layout}: " + ", ".join(sorted(f.path.name for f in d.files.values()))
            elif d.state == "bad":
                detail = "bad: " + ", ".join(str(f.path) for f in d.bad)
            else:
                detail = "missing: " + ", ".join(s.canonical.name for s in d.missing)
            rows.append((d.name, d.state, detail))
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        lines = [f"data root: {self.root}"]
        lines += [f"{a:<{w0}}  {b:<{w1}}  {c}" for a, b, c in rows]
        for f in self.bad_files:
            lines.append(f"BAD {f.detail}")  # the detail starts with the file's path
        return "\n".join(lines)


def check(data_root: Optional[PathLike] = None, names: Optional[Iterable[str]] = None, *,
          registry=None, verify: bool = True) -> CheckReport:
    """Inspect every dataset of the registry (or `names`) in the data root; nothing is
    modified. `verify=False` only looks for the files (no checksums)."""
    registry = REGISTRY if registry is None else registry
    root = resolve_root(data_root)
    names = list(registry) if names is None else list(names)
    for n in names:
        if n not in registry:
            raise KeyError(f"unknown dataset {n!r}; known: {', '.join(sorted(registry))}")
    return CheckReport(root, [inspect_dataset(registry[n], root, verify) for n in names])
