"""Cell steps the backward pass visits for a loss at the last step (adding task), against T.

The sparse engine recomputes and backpropagates only the blocks that hold the loss or a memory
with credit (SPEC §4); full BPTT visits all T steps.  Measured on an untrained SAB and on one
trained for ``--train-steps`` steps on adding at T=``--train-T`` (the attention a trained model
learns decides how many blocks credit reaches).  The credit rule is the reproduction's
(``--rule blocked``: ``block_score_grad``, ``delta_grad``, ε = 0.01, ``sab.repro``) or SPEC §3's
(``--rule spec``: the scores' credit reaches ĥ and the memories, ε = 0).

With ``--copy-run`` it also counts them for a model trained on copying (a ``sab repro`` run,
e.g. ``results/runs/copy100-sab-5-5``) and a loss at the last step of copying sequences of
length T + 20 (the last recalled digit): what a model whose attention has learned to read the
digits' memories sends credit to.

    python -m benchmarks.steps_visited --T 200 500 1000 2000
    python -m benchmarks.steps_visited --T 1000 --copy-run results/runs/copy100-sab-5-5
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

import sab
from sab.engines import forward_backward
from sab.repro import SAB_EPS
from sab.heads import SequenceModel
from sab.tasks import adding_batch, copying_batch, encode_copying

from .common import base_parser, finish, fmt_table, machine


def adding_loss(model, y, T):
    def loss_fn(start, stop, output, summary):
        if stop < T:
            return None
        pred = model.readout(output[-1:], summary[-1:])[0, :, 0]  # (B,)
        return F.mse_loss(pred, y)
    loss_fn.loss_steps = [T - 1]
    return loss_fn


def visited(model, T: int, batch: int, seed: int) -> tuple[float, float]:
    x, y = adding_batch(T, batch, torch.Generator().manual_seed(seed))
    model.zero_grad()
    res = forward_backward(model.rnn, x, adding_loss(model, y, T), engine="sparse")
    return res.stats["steps_backpropagated"], float(res.loss)


def copying_visited(run: str, Ts, seqs: int) -> dict:
    """Mean steps backpropagated for the last recalled digit's loss, per T, of the copying
    model in ``run`` (one sequence per measurement)."""
    from sab.trainer import load_run

    config, _, model, ckpt = load_run(run)
    one_hot = config.task_options.get("one_hot", False)
    out = {}
    for T in Ts:
        counts = []
        for s in range(seqs):
            x, y = copying_batch(T, 1, torch.Generator().manual_seed(2000 + s))  # (T+20, 1)
            L = x.shape[0]

            def loss_fn(start, stop, output, summary):
                if stop < L:
                    return None
                logits = model.readout(output[-1:], summary[-1:])[0]  # (1, 10)
                return F.cross_entropy(logits, y[-1])
            loss_fn.loss_steps = [L - 1]
            model.zero_grad()
            res = forward_backward(model.rnn, encode_copying(x, one_hot), loss_fn, engine="sparse")
            counts.append(res.stats["steps_backpropagated"])
        out[T] = sum(counts) / len(counts)
        print(f"  copying   T={T:5d}  {out[T]:8.1f} of {T + 20} steps ({out[T] / (T + 20):.1%}), "
              f"{Path(run).name} at step {ckpt.get('step', '?')}", flush=True)
    return out


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--T", type=int, nargs="+", default=[200, 500, 1000, 2000])
    p.add_argument("--batch", type=int, default=1, help="sequences per measurement")
    p.add_argument("--seqs", type=int, default=8, help="measurements averaged per T")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--train-T", type=int, default=200)
    p.add_argument("--k-trunc", type=int, default=5)
    p.add_argument("--k-top", type=int, default=5)
    p.add_argument("--k-att", type=int, default=10)
    p.add_argument("--rule", choices=["blocked", "spec"], default="blocked",
                   help="credit rule (default: the reproduction's)")
    p.add_argument("--copy-run", help="also count for this trained copying run (a run directory)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rule = {} if args.rule == "spec" else dict(block_score_grad=True, delta_grad=True,
                                               att_eps=SAB_EPS)
    rnn = sab.SABLSTM(2, 128, k_trunc=args.k_trunc, k_top=args.k_top, k_att=args.k_att, **rule)
    model = SequenceModel(rnn, 1)

    def measure(tag):
        out = {}
        for T in args.T:
            counts = [visited(model, T, args.batch, 1000 + s)[0] for s in range(args.seqs)]
            out[T] = sum(counts) / len(counts)
            print(f"  {tag:9s} T={T:5d}  {out[T]:8.1f} steps ({out[T] / T:.1%})", flush=True)
        return out

    untrained = measure("untrained")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    mse = float("nan")
    for i in range(args.train_steps):
        x, y = adding_batch(args.train_T, 32, g)
        opt.zero_grad()
        res = forward_backward(model.rnn, x, adding_loss(model, y, args.train_T), engine="sparse")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        mse = 0.9 * mse + 0.1 * float(res.loss) if i else float(res.loss)
        if (i + 1) % 100 == 0:
            print(f"  training step {i + 1} of {args.train_steps}: MSE {mse:.4f} (moving "
                  "average; 0.167 predicts 1.0 always)", flush=True)
    trained = measure("trained")
    rows = [[T, T, f"{untrained[T]:.0f}", f"{untrained[T] / T:.1%}", f"{trained[T]:.0f}",
             f"{trained[T] / T:.1%}"] for T in args.T]
    print(f"\nCell steps backpropagated for a loss at the last step (adding), k_trunc="
          f"{args.k_trunc}, k_top={args.k_top}, k_att={args.k_att}, {args.rule} credit; trained {args.train_steps} "
          f"steps at T={args.train_T} (final training MSE {mse:.3f}); mean of {args.seqs} "
          f"sequences")
    print(machine())
    print(fmt_table(["T", "BPTT steps", "SAB untrained", "fraction", "SAB trained", "fraction"],
                    rows))
    results = {"untrained": untrained, "trained": trained, "train_mse": mse}
    if args.copy_run:
        copying = copying_visited(args.copy_run, args.T, args.seqs)
        print(f"\nThe same for {args.copy_run} (trained on copying T=100) and a loss at the last "
              f"step of copying sequences (T + 20 steps); mean of {args.seqs} sequences")
        print(fmt_table(["T", "BPTT steps", "SAB trained on copying", "fraction"],
                        [[T, T + 20, f"{copying[T]:.0f}", f"{copying[T] / (T + 20):.1%}"]
                         for T in args.T]))
        results["copying"] = copying
    finish(args, results)
    return results


if __name__ == "__main__":
    main()
