"""Where along the validation text a language-model checkpoint's bits per character go.

``sab eval`` (and the trainer's evaluations) read a ``ptb`` / ``text8`` split in columns with the
state carried from window to window, SAB's memory included, and report one number.  This reads
the same columns the same way and reports the bits per character of each stretch of ``--every``
characters per column, with the carried state's mean |h| and |c| at its end, beside the same
weights read with ``reset_memory`` (h and c carried, the memory dropped every ``seq_len``
characters, as in training with that option).  It shows whether a bad evaluation is the weights
(bad from the first stretch, in both readings) or the carried state running away along the text
(good at first, worse as the state grows, and not with the memory dropped).  The two totals are
the task's own evaluation with and without ``reset_memory``.

    python -m benchmarks.eval_windows --run results/runs/ptb-sab-5-5-const-delta --every 10000
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Dict, List

import torch

from sab.tasks import CharLMTask
from sab.trainer import load_run

from .common import base_parser, finish, fmt_table, machine


def read(task, model, every: int, window: int = 1000) -> Dict[str, object]:
    """The task's own evaluation (``task.evaluate``, in windows of ``window`` characters with the
    state carried, which does not change the result; ``seq_len`` with ``reset_memory``), split
    into stretches of ``every`` rows (characters per column): per stretch the bits per character
    and the carried state's mean |h|, |c| at its end; and the total."""
    stretches: List[dict] = []
    acc = {"row": 0, "nll": 0.0, "n": 0, "state": None}

    def close():
        state = acc["state"]  # h, c (L, C, H)
        stretches.append({"to_row": acc["row"], "bpc": acc["nll"] / acc["n"] / math.log(2),
                          "h_norm": state.h.norm(dim=-1).mean().item(),
                          "c_norm": state.c.norm(dim=-1).mean().item(),
                          "columns": state.h.shape[1]})
        acc["nll"], acc["n"] = 0.0, 0

    def on_window(nll, y, state):  # y (w, C)
        before = acc["row"]
        acc.update(row=before + y.shape[0], nll=acc["nll"] + nll, n=acc["n"] + y.numel(),
                   state=state)
        if acc["row"] // every != before // every:
            close()

    metrics = task.evaluate(model, chunk_len=window, on_window=on_window)
    if acc["n"]:  # the split's tail after the last whole stretch
        close()
    return {"bpc": metrics["bpc"], "stretches": stretches}


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a ptb or text8 run directory with its ckpt.pt")
    p.add_argument("--every", type=int, default=10000,
                   help="characters per column in each reported stretch (default 10000)")
    p.add_argument("--window", type=int, default=1000,
                   help="characters per column read at once, state carried (default 1000, as "
                        "sab eval; the result does not depend on it)")
    args = p.parse_args(argv)
    if args.every < 1:
        p.error(f"--every must be >= 1 characters, got {args.every}")
    if args.window < 1:
        p.error(f"--window must be >= 1 characters, got {args.window}")
    torch.set_num_threads(args.threads)
    config, task, model, ckpt = load_run(args.run)
    if not isinstance(task, CharLMTask):
        raise SystemExit(f"eval_windows: the {config.task} task is not read as a text; use a ptb "
                         f"or text8 run")
    # the same task (corpus already read) with the memory dropped every seq_len characters
    reset_task = copy.copy(task)
    reset_task.config = dataclasses.replace(task.config, reset_memory=True)
    carried = read(task, model, args.every, args.window)
    reset = read(reset_task, model, args.every)
    print(f"run {args.run}, checkpoint of step {ckpt['step']}, {task.config.eval_split} split in "
          f"{carried['stretches'][0]['columns']} columns; {machine()}")
    rows = []
    for a in carried["stretches"]:  # the reset reading's stretch ending at or after a's
        b = next(s for s in reset["stretches"] if s["to_row"] >= a["to_row"])
        rows.append([a["to_row"], f"{a['bpc']:.3f}", f"{a['h_norm']:.1f}", f"{a['c_norm']:.1f}",
                     b["to_row"], f"{b['bpc']:.3f}", f"{b['c_norm']:.1f}"])
    print(fmt_table(["to char", "carried bpc", "|h|", "|c|", "to char (reset)", "reset bpc",
                     "|c| (reset)"], rows))
    print(f"total: carried {carried['bpc']:.4f}, reset_memory {reset['bpc']:.4f} bits per "
          f"character")
    out = {"run": args.run, "step": ckpt["step"], "carried": carried, "reset_memory": reset}
    finish(args, out)
    return out


if __name__ == "__main__":
    main()
