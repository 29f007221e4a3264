"""What Python's dispatch, and ATen's own per-operation overhead, cost the one-node layer.

The LSTM pointwise backward (``sab.cell.pointwise_backward``, 19 tensor operations on (B, 4H)
and (B, H) tensors) is timed per call three ways: from Python; as the same ATen calls in the
same order from C++ (``sab.native``'s ``pointwise_backward``); and as one pass over the batch
rows doing the same arithmetic (``pointwise_backward_fused``, what the one-node layer's LSTM
backward runs).  All three give the same bits (checked).  Python against C++ is what calling
from C++ saves on each of the ~200 operations a SAB time step dispatches; C++ against the
fused pass is what ATen's allocation and iterator set-up cost per operation on tensors this
small (README, Performance).  Needs a C++ compiler; the first use of ``sab.native`` compiles
for about a minute (cached under ``~/.cache/sab``).

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
    same = all(torch.equal(x, y) for fn in (ext.pointwise_backward, ext.pointwise_backward_fused)
               for x, y in zip(ours, fn(gh, gc, act, c_prev, tc, dgates.clone())))
    py = _per_call_us(lambda: pointwise_backward(gh, gc, act, c_prev, tc, dgates), args.calls,
                      args.rounds)
    cpp = _per_call_us(lambda: ext.pointwise_backward(gh, gc, act, c_prev, tc, dgates),
                       args.calls, args.rounds)
    fused = _per_call_us(lambda: ext.pointwise_backward_fused(gh, gc, act, c_prev, tc, dgates),
                         args.calls, args.rounds)
    print(f"LSTM pointwise backward, B={B}, H={H}, {N_OPS} tensor operations, best of "
          f"{args.rounds} rounds of {args.calls} calls; C++ build or load {built:.1f} s; "
          f"results bit-identical: {same}")
    print(machine())
    print(fmt_table(["called from", "µs per call", "µs per operation"],
                    [["Python", f"{py:.1f}", f"{py / N_OPS:.2f}"],
                     ["C++ (sab.native), the same ATen calls", f"{cpp:.1f}", f"{cpp / N_OPS:.2f}"],
                     ["C++, one pass over the rows", f"{fused:.1f}", "-"],
                     ["Python / C++", f"{py / cpp:.2f}", f"saved {(py - cpp) / N_OPS:.2f}"],
                     ["C++ ATen calls / one pass", f"{cpp / fused:.2f}",
                      f"saved {(cpp - fused) / N_OPS:.2f}"]]))
    results = {"python_us": py, "cpp_us": cpp, "fused_us": fused, "n_ops": N_OPS,
               "bit_identical": same,
               "batch": B, "hidden": H}
    finish(args, results)
    return results


if __name__ == "__main__":
    main()
