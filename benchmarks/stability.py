"""Training stability of SAB on copying over several seeds (SPEC §9, issue 3).

A prototype that weighted memories by raw scores while n <= k_top diverged after ~4k steps on
copying T=100.  This script trains SAB for each seed and reports, per seed, the largest training
loss, hidden-state norm and gradient norm seen at the evaluations, the final accuracy, and whether
the run stayed finite (a non-finite loss stops the trainer with NonFiniteLoss).

    python benchmarks/stability.py --seeds 0 1 2 --steps 4000 --T 100      # the SPEC's check
    python benchmarks/stability.py --seeds 0 1 --steps 300 --T 10 --hidden 32   # minutes
    python benchmarks/stability.py --seeds 0 --steps 400 --full-score-grad     # SPEC §3's default

SAB's settings default to the reproduction rows' (``sab.repro``): ε = 0.01, the scores'
gradient blocked from the states (``block_score_grad``) and δ's gradient into the scorer
(``delta_grad``); ``--const-delta``, ``--full-score-grad`` (which implies it) and ``--att-eps 0``
measure the layer's defaults instead.

Exit status 1 if any seed diverged (non-finite, or a training loss above --max-loss).
"""
import argparse
import json
import sys
import time

import torch

from sab.repro import SAB_BLOCK, SAB_DELTA_GRAD, SAB_EPS
from sab.trainer import ModelConfig, NonFiniteLoss, RunConfig, TrainConfig, Trainer


def run_seed(seed, a):
    cfg = RunConfig("copy", {"T": a.T, "one_hot": a.one_hot, "eval_size": 256},
                    ModelConfig(name="sab", hidden=a.hidden, k_trunc=a.k_trunc, k_top=a.k_top,
                                k_att=a.k_att, att_eps=a.att_eps,
                                block_score_grad=not a.full_score_grad,
                                delta_grad=not (a.full_score_grad or a.const_delta)),
                    TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, clip=a.clip,
                                eval_every=a.eval_every, ckpt_every=a.steps, seed=seed,
                                threads=a.threads))
    trainer = Trainer(cfg)
    t0 = time.time()
    try:
        trainer.run()
        finite = True
    except NonFiniteLoss as e:
        finite, _ = False, print(f"seed {seed}: {e}", file=sys.stderr)
    h = trainer.history[1:] or [{}]
    return {"seed": seed, "finite": finite, "steps": trainer.step,
            "max_train_loss": max(m.get("train_loss") or 0 for m in h),
            "max_h_norm": max(m.get("h_norm") or 0 for m in h),
            "max_grad_norm": max(m.get("grad_norm_max") or 0 for m in h),
            "final_acc": trainer.history[-1].get("eval_acc"), "seconds": round(time.time() - t0)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--T", type=int, default=100)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--one-hot", action="store_true")
    p.add_argument("--k-trunc", type=int, default=5)
    p.add_argument("--k-top", type=int, default=5)
    p.add_argument("--k-att", type=int, default=2)
    p.add_argument("--att-eps", type=float, default=SAB_EPS)
    p.add_argument("--full-score-grad", action="store_true", default=not SAB_BLOCK,
                   help="let the scores' gradient into the memories and ĥ (SPEC §3's default)")
    p.add_argument("--const-delta", action="store_true", default=not SAB_DELTA_GRAD,
                   help="hold the threshold δ constant in the backward pass (SPEC §2.4)")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--max-loss", type=float, default=10.0,
                   help="a training loss above this counts as divergence (chance is ~2.3)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)  # the trainer sets the same; the header reports it
    try:
        from benchmarks.common import machine
        print(machine())
    except ImportError:  # run as a file from elsewhere
        pass
    print("settings: " + json.dumps(vars(a)), flush=True)
    rows = [run_seed(s, a) for s in a.seeds]
    for r in rows:
        print(json.dumps(r), flush=True)
    bad = [r for r in rows if not r["finite"] or r["max_train_loss"] > a.max_loss]
    print("diverged: " + (", ".join(str(r["seed"]) for r in bad) if bad else "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
