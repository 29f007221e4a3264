"""The longest copying T that one training step of each method completes within a memory budget.

For each method T doubles from ``--start`` until the step's peak memory (measured in a fresh
process, see ``peak_memory``) exceeds the budget (default 8 GiB), or the step takes longer than
``--max-seconds`` (then the answer is a lower bound: the method still fitted).  Between the last
fitting and the first failing T a few bisection steps refine the answer.

    python -m benchmarks.max_length --budget-gib 8
"""
from __future__ import annotations

import torch

from .common import METHODS, base_parser, finish, fmt_table, machine
from .peak_memory import measure

GiB = 2 ** 30


def fits(method, T, args) -> tuple[bool, dict]:
    r = measure(method, T, args.batch, args.k_att, timeout=args.max_seconds * 4,
                device=args.device, threads=args.threads)
    ok = "peak_bytes" in r and r["peak_bytes"] <= args.budget_gib * GiB
    print(f"  {method:18s} T={T:7d}  "
          f"{r.get('peak_bytes', float('nan')) / 2**20:9.0f} MiB  {r.get('seconds', 0):7.1f} s  "
          f"{'fits' if ok else 'does not fit'}", flush=True)
    return ok, r


def longest(method, args) -> dict:
    T, best, last = args.start, None, None
    while True:
        ok, r = fits(method, T, args)
        if not ok:
            break
        best, last = T, r
        if r["seconds"] > args.max_seconds:
            return {"T": best, "bound": "time", "peak_bytes": r["peak_bytes"],
                    "seconds": r["seconds"]}
        T *= 2
    if best is None:
        return {"T": 0, "bound": "memory"}
    lo, hi = best, T
    for _ in range(args.bisect):
        mid = (lo + hi) // 2
        ok, r = fits(method, mid, args)
        if ok:
            lo, last = mid, r
        else:
            hi = mid
    return {"T": lo, "bound": "memory", "peak_bytes": last["peak_bytes"],
            "seconds": last["seconds"]}


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["lstm", "sab-ref", "sab-sparse-fused"],
                   choices=sorted(METHODS))
    p.add_argument("--budget-gib", type=float, default=8.0)
    p.add_argument("--start", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--k-att", type=int, default=10)
    p.add_argument("--max-seconds", type=float, default=300.0)
    p.add_argument("--bisect", type=int, default=2)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)  # what each measurement uses, and what the header says
    results = {m: longest(m, args) for m in args.methods}
    rows = [[m, ("≥ " if r["bound"] == "time" else "") + str(r["T"]),
             f"{r.get('peak_bytes', 0) / 2**20:.0f}", f"{r.get('seconds', 0):.0f}",
             "step time cap" if r["bound"] == "time" else "memory budget"]
            for m, r in results.items()]
    print(f"\nLongest copying T whose training step fits in {args.budget_gib} GiB, B={args.batch}, "
          f"H=128, k_trunc=5, k_top=5, k_att={args.k_att}")
    print(machine())
    print(fmt_table(["method", "longest T", "peak MiB", "step s", "stopped by"], rows))
    finish(args, {"results": results})
    return results


if __name__ == "__main__":
    main()
