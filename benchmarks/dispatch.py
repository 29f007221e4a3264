"""What Python's dispatch costs the one-node layer: the same ATen operations called from Python
and from C++.

The LSTM pointwise backward (``sab.cell.pointwise_backward``, 19 tensor operations on (B, 4H)
and (B, H) tensors) is compiled as a C++ function with ``torch.utils.cpp_extension.load_inline``
(the same ATen calls in the same order: the results are compared bit for bit) and both versions
are timed per call.  The difference, per operation, is what ``sab.native``'s step functions
save on each of the ~200 operations a SAB time step dispatches (README, Performance).  Needs a
C++ compiler; the first run compiles for about a minute (cached under
``~/.cache/torch_extensions``).

    python -m benchmarks.dispatch              # B=64, H=128
"""
from __future__ import annotations

import time

import torch

from sab.cell import pointwise_backward

from .common import base_parser, finish, fmt_table, machine

N_OPS = 19  # tensor operations of pointwise_backward (counted with a TorchDispatchMode)

_SOURCE = r"""
#include <torch/extension.h>

// sab.cell.pointwise_backward, operation for operation
std::vector<at::Tensor> pointwise_backward(at::Tensor gh, at::Tensor gc, at::Tensor act,
                                           at::Tensor c_prev, at::Tensor tc, at::Tensor dgates) {
  auto H = c_prev.size(1);
  auto a = act.split(H, 1);  // sigma(i), sigma(f), tanh(g), sigma(o)
  auto deriv = (1 - act).mul_(act);
  auto dg = deriv.narrow(1, 2 * H, H);
  at::mul_out(dg, a[2], a[2]).neg_().add_(1);
  auto dc = gh * a[3];
  dc.mul_(1 - tc * tc).add_(gc);
  auto d = dgates.split(H, 1);
  at::mul_out(d[0], dc, a[2]);
  at::mul_out(d[1], dc, c_prev);
  at::mul_out(d[2], dc, a[0]);
  at::mul_out(d[3], gh, tc);
  dgates.mul_(deriv);
  return {dgates, dc * a[1]};
}
"""


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
    from torch.utils.cpp_extension import load_inline

    t0 = time.time()
    ext = load_inline("sab_dispatch_bench", cpp_sources=_SOURCE, functions=["pointwise_backward"],
                      extra_cflags=["-O2"])
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
                     ["C++ (load_inline)", f"{cpp:.1f}", f"{cpp / N_OPS:.2f}"],
                     ["Python / C++", f"{py / cpp:.2f}", f"saved {(py - cpp) / N_OPS:.2f}"]]))
    results = {"python_us": py, "cpp_us": cpp, "n_ops": N_OPS, "bit_identical": same,
               "batch": B, "hidden": H}
    finish(args, results)
    return results


if __name__ == "__main__":
    main()
