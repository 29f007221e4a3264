"""Peak memory of one training step against T, for each engine and for full BPTT (SPEC §9).

Each measurement runs in a fresh process: peak RSS during one training step (forward, backward,
Adam) minus the RSS just before it, on copying with H=128, k_trunc=5, k_top=5, k_att=10.

    python -m benchmarks.peak_memory                          # T = 1000 … 20000, B = 32
    python -m benchmarks.peak_memory --T 1000 5000 --methods lstm sab-sparse
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import torch

from .common import (METHODS, base_parser, current_rss_bytes, finish, fmt_table, machine,
                     make_step, peak_rss_bytes, reset_peak_rss)

GiB = 2 ** 30


def child(method: str, T: int, batch: int, k_att: int, device: str = "cpu",
          threads: int = 1) -> dict:
    """One training step in this (fresh) process: CPU peak RSS or CUDA allocator peak."""
    torch.set_num_threads(threads)
    step = make_step(METHODS[method], T, batch=batch, k_att=k_att, device=device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = current_rss_bytes()
        reset_peak_rss()
    t0 = time.perf_counter()
    stats = step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
    return {"method": method, "T": T, "peak_bytes": peak - before, "seconds": seconds,
            "steps_backpropagated": stats.get("steps_backpropagated")}


def measure(method: str, T: int, batch: int, k_att: int, timeout: float = 3600,
            device: str = "cpu", threads: int = 1) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.peak_memory", "--child", method, str(T),
           "--batch", str(batch), "--k-att", str(k_att), "--device", device,
           "--threads", str(threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return {"method": method, "T": T, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[1000, 2000, 5000, 10000, 20000])
    p.add_argument("--methods", nargs="+", default=["lstm", "sab-ref", "sab-sparse-fused"],
                   choices=sorted(METHODS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k-att", type=int, default=10)
    p.add_argument("--device", default="cpu", help="cpu (peak RSS) or cuda (allocator peak)")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "T"), help=argparse_hidden())
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.batch, args.k_att,
                               args.device, args.threads)))
        return {}
    torch.set_num_threads(args.threads)  # what the children use, and what the header says
    rows, results = [], []
    for T in args.T:
        for m in args.methods:
            r = measure(m, T, args.batch, args.k_att, device=args.device, threads=args.threads)
            results.append(r)
            shown = f"{r['peak_bytes'] / 2**20:.0f} MiB" if "peak_bytes" in r else r["error"]
            print(f"  {m:18s} T={T:6d}  {shown}  "
                  f"{r.get('seconds', float('nan')):.1f} s", flush=True)
    by = {(r["method"], r["T"]): r for r in results}
    header = ["T"] + [f"{m} MiB" for m in args.methods] + \
        [f"{m}/lstm" for m in args.methods if m != "lstm"] + [f"{m} s" for m in args.methods]
    for T in args.T:
        def mib(m):
            r = by.get((m, T), {})
            return f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else "failed"

        def ratio(m):
            a, b = by.get((m, T), {}), by.get(("lstm", T), {})
            if "peak_bytes" in a and "peak_bytes" in b:
                return f"{a['peak_bytes'] / b['peak_bytes']:.3f}"
            return "-"
        row = [T] + [mib(m) for m in args.methods]
        row += [ratio(m) for m in args.methods if m != "lstm"]
        row += [f"{by.get((m, T), {}).get('seconds', float('nan')):.1f}" for m in args.methods]
        rows.append(row)
    what = "CUDA allocator peak" if args.device.startswith("cuda") else "RSS"
    print(f"\nPeak memory of one training step ({what} above the pre-step level), copying, "
          f"device {args.device}, B={args.batch}, H=128, k_trunc=5, k_top=5, k_att={args.k_att}")
    print(machine())
    print(fmt_table(header, rows))
    finish(args, {"results": results})
    return {"results": results}


def argparse_hidden():
    import argparse
    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
