"""Training stability of SAB on copying over several seeds (SPEC §9, issue 3).

A prototype that weighted memories by raw scores while n <= k_top diverged after ~4k steps on
copying T=100.  This script trains SAB for each seed and reports, per seed, the largest training
loss, hidden-state norm and gradient norm seen at the evaluations, the final accuracy, and whether
the run stayed finite (a non-finite loss stops the trainer with NonFiniteLoss).

    python benchmarks/stability.py --seeds 0 1 2 --steps 4000 --T 100      # the SPEC's check
    python benchmarks/stability.py --seeds 0 1 --steps 300 --T 10 --hidden 32   # minutes

Exit status 1 if any seed diverged (non-finite, or a training loss above --max-loss).
"""
import argparse
import json
import sys
import time

from sab.trainer import ModelConfig, NonFiniteLoss, RunConfig, TrainConfig, Trainer


def run_seed(seed, a):
    cfg = RunConfig("copy", {"T": a.T, "one_hot": a.one_hot, "eval_size": 256},
                    ModelConfig(name="sab", hidden=a.hidden, k_trunc=5, k_top=5, k_att=2),
                    TrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, clip=a.clip,
                                eval_every=a.eval_every, ckpt_every=a.steps, seed=seed))
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
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--max-loss", type=float, default=10.0,
                   help="a training loss above this counts as divergence (chance is ~2.3)")
    a = p.parse_args(argv)
    rows = [run_seed(s, a) for s in a.seeds]
    for r in rows:
        print(json.dumps(r))
    bad = [r for r in rows if not r["finite"] or r["max_train_loss"] > a.max_loss]
    print("diverged: " + (", ".join(str(r["seed"]) for r in bad) if bad else "none"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
