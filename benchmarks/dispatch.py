"""What Python's dispatch costs the one-node layer: the same ATen operations called from Python
and from C++.

The LSTM pointwise backward (``sab.cell.pointwise_backward``, 19 tensor operations on (B, 4H)
and (B, H) tensors) and its C++ twin in ``sab.native`` (the same ATen calls in the same order:
the results are compared bit for bit) are timed per call.  The difference, per operation, is
what ``sab.native``'s step functions save on each of the ~200 operations a SAB time step
dispatches (README, Performance).  Needs a
C++ compiler; the first use of ``sab.native`` compiles for about a minute (cached under
``~/.cache/sab``).

    python -m benchmarks.dispatch              # B=64, H=128
"""
from __future__ import annotations

import time

import torch

from sab import native
from sab.cell import pointwise_backward

from .common import base_parser, finish, fmt_table, machine

N_OPS = 19  # tensor operations of pointwise_backward (counted with a TorchDispatchMode)

def _per_call_us(fn, calls: int, rounds: int) -> float:
    for _ in range(calls // 10):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ext = native.kernels()
    if ext is None:
        raise SystemExit("sab.native did not build (see the warning above): nothing to compare")
    built = time.time() - t0
    B, H = args.batch, args.hidden
    g = torch.Generator().manual_seed(0)
    gh, gc, c_prev, tc = (torch.randn(B, H, generator=g) for _ in range(4))
    act = torch.rand(B, 4 * H, generator=g)
    dgates = torch.empty(B, 4 * H)
    ours = pointwise_backward(gh, gc, act, c_prev, tc, dgates.clone())
    theirs = ext.pointwise_backward(gh, gc, act, c_prev, tc, dgates.clone())
    same = all(torch.equal(x, y) for x, y in zip(ours, theirs))
    py = _per_call_us(lambda: pointwise_backward(gh, gc, act, c_prev, tc, dgates), args.calls,
                      args.rounds)
    cpp = _per_call_us(lambda: ext.pointwise_backward(gh, gc, act, c_prev, tc, dgates),
                       args.calls, args.rounds)
    print(f"LSTM pointwise backward, B={B}, H={H}, {N_OPS} tensor operations, best of "
          f"{args.rounds} rounds of {args.calls} calls; C++ build or load {built:.1f} s; "
          f"results bit-identical: {same}")
    print(machine())
    print(fmt_table(["called from", "µs per call", "µs per operation"],
                    [["Python", f"{py:.1f}", f"{py / N_OPS:.2f}"],
                     ["C++ (sab.native)", f"{cpp:.1f}", f"{cpp / N_OPS:.2f}"],
                     ["Python / C++", f"{py / cpp:.2f}", f"saved {(py - cpp) / N_OPS:.2f}"]]))
    results = {"python_us": py, "cpp_us": cpp, "n_ops": N_OPS, "bit_identical": same,
               "batch": B, "hidden": H}
    finish(args, results)
    return results


if __name__ == "__main__":
    main()
