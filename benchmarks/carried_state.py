"""How much a run's training loss owes to the state it carried in from earlier weights.

A language-model run (``ptb``, ``text8``) carries its state from window to window, so the loss it
logs on a window is computed with a state that the weights of the preceding optimizer steps left
behind; validation runs the final weights over the text from a cold start, with the state those
weights produce themselves.  This loads a run directory's checkpoint and, on the next windows of
its own training stream, with the weights frozen, compares the loss (nats per character) given

* **carried**: the checkpoint's carried state — exactly what the next training step would see;
* **own**: the state the frozen weights produce running the same columns from a cold start
  ``--warmup`` rows earlier (default: from the epoch's start, as the training stream did);

and, for SAB, which part of the state holds the difference: the carried memory with the own
h and c, and the own memory with the carried h and c (first window).  Both states then run on
side by side, so the table shows whether the difference fades or persists.

    python -m benchmarks.carried_state --run results/runs/ptb-sab-5-5 --windows 20
"""
from __future__ import annotations

import dataclasses
import math

import torch

from sab.data import iter_windows
from sab.state import RecurrentState
from sab.tasks import Chunk

from .common import base_parser, finish, fmt_table, machine, trainer_at_checkpoint


def _window_loss(model, task, columns, row: int, seq_len: int, state):
    """(the task's training loss — mean cross-entropy in nats —, state after) of the window
    starting at ``row``."""
    x, y = next(iter_windows(columns, seq_len, row))  # (L, B) each
    loss_fn = task.loss_fn(Chunk(x, y, False), model.readout)
    with torch.no_grad():
        output, state, records = model(x, task.carry(state), return_attention=True)
        loss = loss_fn(0, x.shape[0], output, records[-1].summary)
    return loss.item(), state


def _mean_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().mean())


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory with config.json and ckpt.pt")
    p.add_argument("--windows", type=int, default=20,
                   help="windows to compare after the checkpoint (default 20)")
    p.add_argument("--warmup", type=int, default=None,
                   help="rows before the checkpoint's position where the own state starts cold "
                        "(rounded up to whole windows; default: the epoch's start)")
    args = p.parse_args(argv)
    if args.windows < 1:
        p.error(f"--windows must be >= 1, got {args.windows}")
    if args.warmup is not None and args.warmup < 0:
        p.error(f"--warmup must be >= 0 rows, got {args.warmup}")
    trainer, ckpt = trainer_at_checkpoint(args.run, args.threads)
    task, model, stream = trainer.task, trainer.model.eval(), trainer.stream
    if not task.carries_state or not hasattr(stream, "columns"):
        raise SystemExit(f"carried_state: the {trainer.config.task} task does not carry its state "
                         f"between training windows; use a ptb or text8 run")
    columns, seq_len, row = stream.columns, stream.seq_len, stream.row  # columns (N, B)
    last = columns.shape[0] - 1  # the last row a window can start before
    carried = ckpt["state"]
    if carried is None or row == 0 or row >= last:
        raise SystemExit(f"carried_state: the checkpoint of step {ckpt['step']} sits at an epoch "
                         f"boundary (row {row}); its next window starts cold")
    windows = min(args.windows, -(-(last - row) // seq_len))
    back = row if args.warmup is None else min(row, -(-args.warmup // seq_len) * seq_len)
    start = row - back
    # cold at ``start``, with the global step there so the memory writes keep their phase
    zeros = torch.zeros_like(carried.h)  # (layers, B, H)
    own = RecurrentState(zeros, zeros, None, carried.step - back)
    for r in range(start, row, seq_len):
        _, own = _window_loss(model, task, columns, r, seq_len, own)
    swaps = {}
    if back and carried.memory is not None and any(m is not None for m in carried.memory):
        swaps["carried memory, own h and c"] = _window_loss(
            model, task, columns, row, seq_len, dataclasses.replace(carried, h=own.h, c=own.c))[0]
        swaps["own memory, carried h and c"] = _window_loss(
            model, task, columns, row, seq_len, dataclasses.replace(own, h=carried.h, c=carried.c))[0]
    rows, results = [], []
    a, b = carried, own
    for i in range(windows):
        r = row + i * seq_len
        la, a = _window_loss(model, task, columns, r, seq_len, a)
        lb, b = _window_loss(model, task, columns, r, seq_len, b)
        dh, dc = _mean_abs(a.h, b.h), _mean_abs(a.c, b.c)
        results.append({"window": i, "row": r, "carried": la, "own": lb, "gap": lb - la,
                        "mean_abs_dh": dh, "mean_abs_dc": dc})
        rows.append([i, r, f"{la:.4f}", f"{lb:.4f}", f"{lb - la:+.4f}", f"{dh:.3g}", f"{dc:.3g}"])
    gaps = [r["gap"] for r in results]
    mean_gap = sum(gaps) / len(gaps)
    print(f"run {args.run}, checkpoint of step {ckpt['step']}, stream row {row} of epoch "
          f"{stream.epoch}; own state cold from row {start} ({back} rows before); weights frozen")
    print(machine())
    print(fmt_table(["window", "row", "carried (nats)", "own (nats)", "own - carried",
                     "mean |Δh|", "mean |Δc|"], rows))
    print(f"mean gap {mean_gap:+.4f} nats ({mean_gap / math.log(2):+.4f} bits per character) "
          f"over {windows} windows of {seq_len}")
    for name, loss in swaps.items():
        print(f"first window with {name}: {loss:.4f} nats")
    out = {"run": args.run, "step": ckpt["step"], "row": row, "epoch": stream.epoch,
           "own_from_row": start, "windows": results, "mean_gap_nats": mean_gap,
           "swaps": swaps}
    finish(args, out)
    return out


if __name__ == "__main__":
    main()
