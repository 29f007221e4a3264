"""Training-step time (forward + backward + Adam) of each method against the fused nn.LSTM.

Copying, H=128, B=64, k_trunc=5, k_top=5, k_att=2 (SPEC §9).  Prints milliseconds and ratios to
the fused nn.LSTM full-BPTT step and to the straightforward implementation ("naive": dense
attention over all memories, the whole graph kept — the way the authors' code is written).
SAB methods train with the reproduction's credit rule (block_score_grad + delta_grad) unless
named ``-spec`` (SPEC §3's rule); ``sab-ref`` takes the one-node layer (``sab.fused``),
``sab-ref-generic`` the per-step graph; ``-fused`` rows rank the memories with the
``torch.compile``d kernel (``fused_scorer=True``; its compilation happens in the warm-up call).

    python -m benchmarks.step_time                     # T = 100, 200, 1000
    python -m benchmarks.step_time --T 100 200 --methods lstm sab-sparse naive
"""
from __future__ import annotations

import statistics

import torch

from .common import B, METHODS, base_parser, finish, fmt_table, machine, make_step, timed

DEFAULT_METHODS = ["lstm", "tbptt", "sab-ref", "sab-ref-fused", "sab-ref-generic", "sab-ref-spec",
                   "sab-sparse", "sab-sparse-dot", "naive"]


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[100, 200, 1000])
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=sorted(METHODS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--naive-max-T", type=int, default=400,
                   help="skip the naive method above this T (it is quadratic)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    times, ratios, nonfinite = {}, {}, {}
    for T in args.T:
        names = [n for n in args.methods if not (n == "naive" and T > args.naive_max_T)]
        steps = {n: make_step(METHODS[n], T, device=args.device) for n in names}
        reps = args.repeats if T <= 200 else max(1, args.repeats - 1)
        # rounds over the methods: a slow spell of the machine (these are shared virtual
        # machines) then hits every method of a round alike instead of whichever ran during it
        for n in names:
            timed(steps[n], 0, warmup=1, sync=sync)
        samples = {n: [] for n in names}  # one time per method per round
        for _ in range(reps):
            for n in names:
                samples[n].append(timed(steps[n], 1, warmup=0, sync=sync))
        for n in names:
            times[(n, T)] = min(samples[n])
            for ref in ("lstm", "naive"):
                if ref in samples:  # the ratio within each round, its median over the rounds
                    ratios[(n, ref, T)] = statistics.median(
                        a / b for a, b in zip(samples[n], samples[ref]))
            print(f"  {n:18s} T={T:5d}  {times[(n, T)] * 1e3:9.1f} ms  (rounds: "
                  + " ".join(f"{x * 1e3:.0f}" for x in samples[n]) + ")"
                  + (f"; gradient not finite in {steps[n].nonfinite} of {reps + 1} steps "
                     "(Adam skipped them)" if steps[n].nonfinite else ""), flush=True)
            if steps[n].nonfinite:
                nonfinite[(n, T)] = (steps[n].nonfinite, reps + 1)
        del steps
    header = ["method"] + [f"T={T} ms" for T in args.T] + [f"T={T} ×lstm" for T in args.T] \
        + [f"T={T} naive/x" for T in args.T if ("naive", T) in times]
    rows = []
    for name in args.methods:
        row = [name]
        row += [f"{times[(name, T)] * 1e3:.0f}" + ("*" if (name, T) in nonfinite else "")
                if (name, T) in times else "-" for T in args.T]
        row += [f"{ratios[(name, 'lstm', T)]:.2f}" if (name, "lstm", T) in ratios else "-"
                for T in args.T]
        row += [f"{1 / ratios[(name, 'naive', T)]:.2f}" if (name, "naive", T) in ratios else "-"
                for T in args.T if ("naive", T) in times]
        rows.append(row)
    print(f"\nTraining-step time, copying, B={B}, H=128, k_trunc=5, k_top=5, k_att=2, "
          f"device {args.device}; ms: best of {args.repeats} rounds ({max(1, args.repeats - 1)} "
          f"above T=200); ratios: median over the rounds of the ratio within a round")
    print(machine())
    print(fmt_table(header, rows))
    if nonfinite:
        print("* the gradient was not finite in some steps (Adam skipped them): "
              + ", ".join(f"{n} T={T}: {k} of {total}" for (n, T), (k, total) in nonfinite.items()))
    results = {"times_s": {f"{n}@{T}": t for (n, T), t in times.items()},
               "nonfinite_steps": {f"{n}@{T}": k for (n, T), (k, _) in nonfinite.items()},
               "median_ratio": {f"{n}/{ref}@{T}": r for (n, ref, T), r in ratios.items()}}
    finish(args, results)
    return results


if __name__ == "__main__":
    main()
