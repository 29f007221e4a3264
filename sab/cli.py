"""The ``sab`` command line: train, eval, plot, demo, data.

    sab train --task copy --model sab --T 100 --k-trunc 5 --k-top 5 --k-att 2 --steps N --out DIR
    sab eval  --run DIR [--T 200 5000]
    sab plot  --run DIR
    sab demo  [--out DIR]                 # SAB and TBPTT side by side on copying, a table, a plot
    sab train --task ptb --data-dir ROOT --seq-len 150 --max-memories 300 --out DIR
    sab train --task fmnist|pfmnist|mnist|pmnist|cifar10 [--dataset mnist5k] --out DIR
    sab data  fetch|prepare|check NAME    # the datasets (SPEC §10)
    sab repro list|run ROW...|transfer|report   # the paper's tables from recorded runs

Every field of the config is a flag of ``sab train``; ``--config FILE`` loads a saved
``config.json`` and flags given explicitly override its fields.  ``torchrun --nproc-per-node N
-m sab train ...`` trains data-parallel (see ``sab.trainer``).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

from .engines import ENGINES
from .models import MODELS
from .scorer import SCORERS
from .tasks import TASKS

__all__ = ["main", "build_parser"]

# flag dest -> (config section, field); task options are validated against the chosen task
_TASK_FLAGS = {"T": "T", "one_hot": "one_hot", "adding_target": "target",
               "eval_size": "eval_size", "eval_seed": "eval_seed", "dataset": "dataset",
               "data_dir": "data_dir", "seq_len": "seq_len", "eval_split": "eval_split",
               "eval_columns": "eval_columns", "valid_size": "valid_size",
               "perm_seed": "perm_seed", "reset_memory": "reset_memory"}
_MODEL_FLAGS = {"model": "name", "hidden": "hidden", "num_layers": "num_layers",
                "k_trunc": "k_trunc", "k_top": "k_top", "k_att": "k_att",
                "att_hidden": "att_hidden", "scorer": "scorer", "dropout": "dropout",
                "fused_scorer": "fused_scorer", "max_memories": "max_memories", "embed": "embed",
                "att_eps": "att_eps", "block_score_grad": "block_score_grad",
                "delta_grad": "delta_grad"}
_TRAIN_FLAGS = {"steps": "steps", "batch_size": "batch_size", "lr": "lr",
                "lr_schedule": "lr_schedule", "clip": "clip",
                "eval_every": "eval_every", "ckpt_every": "ckpt_every",
                "eval_batch": "eval_batch", "seed": "seed", "engine": "engine",
                "credit_tol": "credit_tol", "threads": "threads", "device": "device"}

# --dry-run sizes; the task's own (its ``dry_run``: T, seq_len, eval_size ...) are added
DRY_RUN = {"steps": 2, "batch_size": 4, "eval_every": 1, "ckpt_every": 2, "eval_batch": 4,
           "hidden": 8, "embed": 8}


class CLIError(Exception):
    """A usage error: printed as ``sab: error: ...`` with exit code 2."""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _nonneg_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def _unit_float(text: str) -> float:
    value = _nonneg_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    S = argparse.SUPPRESS  # unset flags stay unset: defaults come from the config classes
    g = p.add_argument_group("task")
    g.add_argument("--task", choices=sorted(TASKS), default=S, help="task (default copy)")
    g.add_argument("--T", type=_positive_int, default=S,
                   help="sequence length parameter: copying T (input T+20), adding length")
    g.add_argument("--one-hot", action="store_true", default=S,
                   help="copying: feed one-hot symbols instead of the scalar value")
    g.add_argument("--adding-target", choices=["sum", "mean"], default=S,
                   help="adding: predict the sum (paper) or the mean (authors' variant)")
    g.add_argument("--eval-size", type=_positive_int, default=S,
                   help="sequences in the fixed evaluation set (default 512)")
    g.add_argument("--eval-seed", type=int, default=S, help="seed of the evaluation set")
    g.add_argument("--dataset", default=S,
                   help="data tasks: the dataset read (mnist, pmnist: mnist or mnist5k; "
                        "ptb: ptb_char; see `sab data check`)")
    g.add_argument("--data-dir", default=S,
                   help="data tasks: the data root (default $SAB_DATA, else ~/.cache/sab)")
    g.add_argument("--seq-len", type=_positive_int, default=S,
                   help="ptb, text8: characters per training window (default 150)")
    g.add_argument("--eval-split", choices=["valid", "test"], default=S,
                   help="data tasks: the split evaluated during training (default valid)")
    g.add_argument("--eval-columns", type=_positive_int, default=S,
                   help="ptb, text8: contiguous columns the evaluation text is read in "
                        "(default 10)")
    g.add_argument("--reset-memory", action="store_true", default=S,
                   help="ptb, text8: empty SAB's memory at every window (h, c still carried)")
    g.add_argument("--valid-size", type=_positive_int, default=S,
                   help="image tasks: training images held out for validation "
                        "(default 5000; mnist5k 400)")
    g.add_argument("--perm-seed", type=int, default=S,
                   help="pmnist, pfmnist: seed of the fixed pixel permutation (default 1234)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=sorted(MODELS), default=S, help="recurrent model (default sab)")
    g.add_argument("--hidden", type=_positive_int, default=S, help="hidden size (default 128)")
    g.add_argument("--num-layers", type=_positive_int, default=S)
    g.add_argument("--k-trunc", type=_positive_int, default=S,
                   help="sab, tbptt: truncation length (default 5)")
    g.add_argument("--k-top", type=_nonneg_int, default=S,
                   help="sab: memories retrieved per step (default 5; 0 = attention off)")
    g.add_argument("--k-att", type=_positive_int, default=S,
                   help="sab: write a memory every k_att steps (default 2)")
    g.add_argument("--att-hidden", type=_positive_int, default=S,
                   help="sab, selfattn: width of the MLP scorer (default: hidden)")
    g.add_argument("--scorer", choices=sorted(SCORERS), default=S,
                   help="sab, selfattn: mlp (SPEC §2.3, default), dot (cheaper), release "
                        "(the authors', comparison only)")
    g.add_argument("--att-eps", type=_nonneg_float, default=S,
                   help="sab: ε of w = ã/(Σã+ε) (default 0: exact normalisation)")
    g.add_argument("--block-score-grad", action="store_true", default=S,
                   help="sab, selfattn: the attention scores send gradient to the scorer's "
                        "parameters only, not into the states (the authors' "
                        "block_attn_grad_past; keeps long memory chains stable)")
    g.add_argument("--delta-grad", action="store_true", default=S,
                   help="sab, with --block-score-grad: the threshold δ (the (k_top+1)-th score) "
                        "passes its gradient on to the scorer's parameters, as in the authors' "
                        "code; without it δ is a constant (SPEC §2.4)")
    g.add_argument("--fused-scorer", action="store_true", default=S,
                   help="sab: rank memories with a torch.compile'd kernel (long T)")
    g.add_argument("--dropout", type=_nonneg_float, default=S, help="between layers")
    g.add_argument("--max-memories", type=_positive_int, default=S,
                   help="sab, selfattn: memories kept per layer, the oldest evicted "
                        "(default: all; bound it when the state is carried, as in ptb)")
    g.add_argument("--embed", type=_positive_int, default=S,
                   help="ptb, text8: embedding size of the input characters (default 64)")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=_positive_int, default=S, help="optimizer steps (default 10000)")
    g.add_argument("--batch-size", type=_positive_int, default=S,
                   help="global batch (split over processes; default 64)")
    g.add_argument("--lr", type=_nonneg_float, default=S, help="Adam learning rate (default 1e-3)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"], default=S,
                   help="constant (default) or cosine: decays lr to ~0 at --steps (so a run "
                        "extended to more steps changes its schedule)")
    g.add_argument("--clip", type=_nonneg_float, default=S,
                   help="gradient-norm clip (default 1.0; 0: off)")
    g.add_argument("--eval-every", type=_positive_int, default=S, help="default 200")
    g.add_argument("--ckpt-every", type=_positive_int, default=S, help="default 200")
    g.add_argument("--eval-batch", type=_positive_int, default=S)
    g.add_argument("--seed", type=int, default=S, help="seed of data and initialisation (default 0)")
    g.add_argument("--engine", choices=sorted(ENGINES), default=S,
                   help="forward/backward engine (default reference)")
    g.add_argument("--credit-tol", type=_unit_float, default=S,
                   help="sparse engine only, an approximation (not SAB's credit rule): cut off a "
                        "memory whose credit is below this fraction of the largest memory's, "
                        "and skip what only it reached (default 0: exact)")
    g.add_argument("--threads", type=_positive_int, default=S,
                   help="torch threads on CPU (default 1)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=S)
    g = p.add_argument_group("run")
    g.add_argument("--out", required=True, help="run directory (resumed if it holds ckpt.pt)")
    g.add_argument("--config", help="a saved config.json to start from; flags override it")
    g.add_argument("--dry-run", action="store_true",
                   help="the whole path in seconds: tiny model, T, batch and 2 steps")
    # hidden test hooks
    g.add_argument("--debug-nan-at-step", type=int, default=None, help=argparse.SUPPRESS)
    g.add_argument("--bar-position", type=int, default=0, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sab", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,plot,demo,data,repro}")
    sub.required = True

    p = sub.add_parser("train", help="train a model on a task (resumes from DIR/ckpt.pt)",
                       description="Train; every config field is a flag. Resumes by itself "
                                   "when --out holds a checkpoint.")
    _add_train_flags(p)

    p = sub.add_parser("eval", help="evaluate a trained run, also at other lengths (transfer)")
    p.add_argument("--run", required=True, help="run directory")
    p.add_argument("--T", type=_positive_int, nargs="+", default=None,
                   help="evaluate at these T (default: the trained T)")
    p.add_argument("--eval-size", type=_positive_int, default=None)
    p.add_argument("--split", choices=["valid", "test"], default=None,
                   help="data tasks: the split to evaluate (default: the run's eval_split)")
    p.add_argument("--data-dir", default=None, help="data tasks: the data root")
    p.add_argument("--eval-batch", type=_positive_int, default=64)
    p.add_argument("--chunk-len", type=_positive_int, default=1000,
                   help="steps per window (state carried) for long sequences")
    p.add_argument("--per-position", action="store_true",
                   help="copying: also the accuracy and cross-entropy at each recalled digit")
    p.add_argument("--threads", type=_positive_int, default=None)

    p = sub.add_parser("plot", help="learning curves and attention map of a run (PNG); with "
                                    "several --run, one metric of them all in one figure")
    p.add_argument("--run", required=True, action="append",
                   help="run directory (repeat it to compare runs)")
    p.add_argument("--out", help="with several --run: the PNG to write (default compare.png)")
    p.add_argument("--metric", help="with several --run: the metric (default the task's main "
                                    "one, e.g. acc, mse, bpc)")

    p = sub.add_parser("demo", help="SAB vs TBPTT on copying, side by side (the README's job)")
    p.add_argument("--out", default="runs/demo", help="directory of the two runs")
    p.add_argument("--T", type=_positive_int, default=None)
    p.add_argument("--steps", type=_positive_int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true")

    from .data.cli import add_data_commands
    add_data_commands(sub)  # `sab data fetch|prepare|check` (SPEC §10)
    from .repro import add_repro_commands
    add_repro_commands(sub)  # `sab repro list|run|transfer|report` (the paper's tables)
    return parser


# -- train ---------------------------------------------------------------------------------------

def resolve_train_config(args: argparse.Namespace):
    """defaults (component configs) <- --config FILE <- explicit flags (<- --dry-run sizes)."""
    from .trainer import ConfigError, RunConfig

    given = vars(args)
    config = RunConfig.load(args.config) if args.config else RunConfig()
    if "task" in given and given["task"] != config.task:
        config.task, config.task_options = given["task"], {}
    if getattr(args, "dry_run", False):
        task_dry = getattr(TASKS.get(config.task), "dry_run", {})
        flag = {name: dest for dest, name in _TASK_FLAGS.items()}
        for key, value in {**DRY_RUN, **{flag[k]: v for k, v in task_dry.items()}}.items():
            given.setdefault(key, value)
    for dest, name in _TASK_FLAGS.items():
        if dest in given:
            config.task_options[name] = given[dest]
    for dest, name in _MODEL_FLAGS.items():
        if dest in given:
            setattr(config.model, name, given[dest])
    for dest, name in _TRAIN_FLAGS.items():
        if dest in given:
            setattr(config.train, name, given[dest])
    try:
        return config.resolved()
    except ConfigError:
        raise
    except TypeError as e:  # an option the chosen task does not have
        raise ConfigError(str(e)) from None


def cmd_train(args) -> int:
    from .trainer import init_distributed_from_env, shutdown_distributed

    config = resolve_train_config(args)
    joined = init_distributed_from_env()
    ok = False
    try:
        rc = _train(config, args)
        ok = rc == 0  # after a non-finite loss a peer may not reach the barrier
        return rc
    finally:
        if joined:
            shutdown_distributed(sync=ok)


def _train(config, args) -> int:
    from .trainer import NonFiniteLoss, Trainer, stop_on_signals

    command = " ".join(shlex.quote(a) for a in ["sab"] + sys.argv[1:])
    trainer = Trainer(config, args.out, command=command, debug_nan_at_step=args.debug_nan_at_step,
                      progress_position=args.bar_position)
    def on_stop(name: str) -> None:
        print(f"sab: {name}: stopping after this step (checkpoint) ...", file=sys.stderr)
        trainer.stop_requested = True

    try:
        # ranks must stop at the same step: under torchrun, leave the signals to it
        with stop_on_signals(on_stop) if trainer.world == 1 else contextlib.nullcontext():
            last = trainer.run()
    except NonFiniteLoss as e:
        ckpt = Path(args.out) / "ckpt.pt"
        kept = f"the last good checkpoint {ckpt} is kept" if ckpt.exists() else \
            "no checkpoint had been written yet"
        print(f"sab: error: {e}; training stopped, {kept}", file=sys.stderr)
        return 3
    if trainer.rank == 0:
        print(json.dumps({"run": str(args.out), **last}))
    return 0


# -- eval ----------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    import torch
    from .trainer import evaluate_run

    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("data_dir", args.data_dir), ("eval_split", args.split),
                                   ("eval_size", args.eval_size)) if v is not None}
    evaluate_run(args.run, args.T, task_options=overrides, eval_batch=args.eval_batch,
                 chunk_len=args.chunk_len, on_row=lambda r: print(json.dumps(r), flush=True),
                 per_position=args.per_position)
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_compare, plot_run

    if len(args.run) > 1:
        try:
            print(plot_compare(args.run, args.out or "compare.png", args.metric))
        except ValueError as e:
            raise CLIError(str(e)) from None
        return 0
    if args.out or args.metric:
        raise CLIError("--out and --metric compare several runs: give --run more than once")
    for path in plot_run(args.run[0]):
        print(path)
    return 0


# -- demo ----------------------------------------------------------------------------------------

# Settings found by running them on the 2-core machine (README, "What the demo shows").
DEMO = {"T": 5, "steps": 14000, "hidden": 64, "batch_size": 64, "lr": 5e-3,
        "lr_schedule": "cosine", "clip": 0.0,
        "k_trunc": 5, "k_top": 3, "k_att": 1, "eval_every": 250, "one_hot": True,
        "block_score_grad": True, "delta_grad": True, "att_eps": 0.01}


def cmd_demo(args) -> int:
    """Train SAB and TBPTT(k_trunc) on the same copying task in two 1-thread processes side by
    side, print a table and write SAB's attention map."""
    out = Path(args.out)
    d = dict(DEMO)
    if args.T:
        d["T"] = args.T
    if args.steps:
        d["steps"] = args.steps
    if args.dry_run:  # the demo's explicit flags would override --dry-run's sizes
        d.update(steps=DRY_RUN["steps"], eval_every=DRY_RUN["eval_every"],
                 hidden=DRY_RUN["hidden"], batch_size=DRY_RUN["batch_size"])
    common = ["--task", "copy", "--T", str(d["T"]), "--hidden", str(d["hidden"]),
              "--batch-size", str(d["batch_size"]), "--lr", str(d["lr"]), "--lr-schedule",
              d["lr_schedule"], "--clip", str(d["clip"]),
              "--k-trunc",
              str(d["k_trunc"]), "--steps", str(d["steps"]), "--eval-every",
              str(d["eval_every"]), "--ckpt-every", str(d["eval_every"]), "--seed",
              str(args.seed), "--threads", "1"]
    if d["one_hot"]:
        common.append("--one-hot")
    if args.dry_run:
        common.append("--dry-run")
    sab_flags = ["--model", "sab", "--k-top", str(d["k_top"]), "--k-att", str(d["k_att"])]
    if d["block_score_grad"]:
        sab_flags.append("--block-score-grad")
    if d["delta_grad"]:
        sab_flags.append("--delta-grad")
    if d["att_eps"]:
        sab_flags += ["--att-eps", str(d["att_eps"])]
    runs = {"sab": common + sab_flags,
            "tbptt": common + ["--model", "tbptt"]}
    t0 = time.time()
    procs = {}
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for i, (name, flags) in enumerate(runs.items()):
        cmd = [sys.executable, "-m", "sab", "train", *flags, "--out", str(out / name),
               "--bar-position", str(i)]
        procs[name] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    results, failed = {}, []
    for name, proc in procs.items():
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            failed.append(name)
            continue
        results[name] = json.loads(stdout.strip().splitlines()[-1])
    wall = time.time() - t0
    if failed:
        print(f"sab: error: the {', '.join(failed)} run failed (see above)", file=sys.stderr)
        return 1
    print(f"\ncopying T={d['T']} (sequences of {d['T'] + 20} steps), {d['steps']} steps, "
          f"hidden {d['hidden']}, batch {d['batch_size']}, k_trunc {d['k_trunc']}; "
          f"wall time {wall:.0f} s")
    print(f"{'model':<26}{'acc (10 digits)':>16}{'CE10':>8}{'CE':>8}   best acc (step)")
    labels = {"sab": f"SAB k_top={d['k_top']} k_att={d['k_att']}",
              "tbptt": f"TBPTT k_trunc={d['k_trunc']}"}
    for name, r in results.items():
        with open(out / name / "metrics.jsonl") as f:
            best = max((json.loads(line) for line in f if line.strip()),
                       key=lambda m: m.get("eval_acc", -1.0))
        print(f"{labels[name]:<26}{100 * r['eval_acc']:>15.1f}%{r['eval_ce10']:>8.3f}"
              f"{r['eval_ce']:>8.3f}   {100 * best['eval_acc']:.1f}% ({best['step']})")
    from .tasks import CopyingTask
    print(f"{'no memory (chance)':<26}{12.5:>15.1f}%{math.log(8):>8.3f}"
          f"{CopyingTask.no_memory_ce(d['T']):>8.3f}")
    from .plots import plot_run
    for name in runs:
        for path in plot_run(out / name):
            print(f"wrote {path}")
    return 0


# -- main ----------------------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .data import DataError
    from .trainer import ConfigError

    handlers = {"train": cmd_train, "eval": cmd_eval, "plot": cmd_plot, "demo": cmd_demo}
    try:
        if args.command in ("data", "repro"):
            return args.func(args)
        return handlers[args.command](args)
    except (ConfigError, CLIError) as e:
        parser.error(str(e))  # exits with status 2
    except DataError as e:  # a missing or bad data file: the data layer says what to do
        print(f"sab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
