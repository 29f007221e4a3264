"""Cell steps the backward pass visits for a loss at the last step (adding task), against T.

The sparse engine recomputes and backpropagates only the blocks that hold the loss or a memory
with credit (SPEC §4); full BPTT visits all T steps.  Measured on an untrained SAB and on one
trained for ``--train-steps`` steps on adding at T=``--train-T`` (the attention a trained model
learns decides how many blocks credit reaches).  The credit rule is the reproduction's
(``--rule blocked``: ``block_score_grad``, ``delta_grad``, ε = 0.01, ``sab.repro``) or SPEC §3's
(``--rule spec``: the scores' credit reaches ĥ and the memories, ε = 0).

With ``--runs`` it also counts them for trained models (``sab repro`` run directories, with
their own k_trunc, k_top, k_att and credit rule): for an adding run (e.g.
``results/runs/adding200-sab-5-5``) the loss at the last step of adding sequences of length T —
the issue's measurement, with attention that has learned to read the two marked steps; for a
copying run (e.g. ``results/runs/copy100-sab-5-5``) the loss at the last step of copying
sequences of length T + 20 (the last recalled digit).  Each row also gives the model's loss on
those sequences (whether it still solves the task at that T), and in how many steps 99.9% of
the credit lies (Σ_t |∂L/∂x_t| of the reference engine): the exact rule visits every step with
non-zero credit, however small.  ``--credit-tol TOL...`` measures the sparse engine's opt-in
approximation (``credit_tol``: memories whose credit is below TOL of the largest memory's are cut
off, not SAB's rule) on the same sequences: the steps it visits and the relative error of the
parameter gradient it gives, ‖g_tol − g‖ / ‖g‖, against the exact one.

    python -m benchmarks.steps_visited --T 200 500 1000 2000
    python -m benchmarks.steps_visited --T 1000 --runs results/runs/adding200-sab-5-5 \
        results/runs/copy100-sab-5-5 --credit-tol 0.01 0.05
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


def credit_steps(g: torch.Tensor, share: float = 0.999) -> int:
    """The fewest steps that hold ``share`` of the credit ``g`` (T,) = Σ|∂L/∂x_t| per step."""
    srt = g.sort(descending=True).values
    return int((srt.cumsum(0) < share * srt.sum()).sum()) + 1


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run_visited(run: str, Ts, seqs: int, tols=()) -> dict:
    """Per T, the mean steps backpropagated for a loss at the last step, and the mean loss, of
    the trained model in ``run`` (an adding or copying run; one sequence per measurement); also
    how the credit spreads over them: the reference engine's input gradient of the same loss
    has no more non-zero steps (checked; fewer where float32 gates saturate), and ``held`` is the mean number of steps that
    hold 99.9% of Σ_t |∂L/∂x_t| (what an engine dropping negligible credit would still visit);
    per ``credit_tol`` in ``tols``, the steps that approximation visits and its gradient's
    relative error."""
    from sab.trainer import load_run

    config, _, model, ckpt = load_run(run)
    if config.task not in ("adding", "copy"):
        raise SystemExit(f"--runs: {run} trained {config.task!r}; steps_visited counts adding "
                         "and copying runs")
    out = {}
    for T in Ts:
        counts, losses, held = [], [], []
        approx = {tol: ([], []) for tol in tols}  # steps visited, relative gradient error
        for s in range(seqs):
            g = torch.Generator().manual_seed(2000 + s)
            if config.task == "adding":
                x, y = adding_batch(T, 1, g, target=config.task_options.get("target", "sum"))
                L, loss_fn = T, adding_loss(model, y, T)
            else:
                x, y = copying_batch(T, 1, g)  # (T+20, 1): the loss at the last recalled digit
                L = x.shape[0]
                x = encode_copying(x, config.task_options.get("one_hot", False))

                def loss_fn(start, stop, output, summary, L=L, y=y):
                    if stop < L:
                        return None
                    logits = model.readout(output[-1:], summary[-1:])[0]  # (1, 10)
                    return F.cross_entropy(logits, y[-1])
                loss_fn.loss_steps = [L - 1]
            model.zero_grad()
            res = forward_backward(model.rnn, x, loss_fn, engine="sparse")
            counts.append(res.stats["steps_backpropagated"])
            losses.append(float(res.loss))
            exact = _grads(model)
            for tol in tols:
                model.zero_grad()
                cut = forward_backward(model.rnn, x, loss_fn, engine="sparse", credit_tol=tol)
                approx[tol][0].append(cut.stats["steps_backpropagated"])
                approx[tol][1].append(float((_grads(model) - exact).norm() / exact.norm()))
            xg = x.clone().requires_grad_(True)  # the same loss through the reference engine
            forward_backward(model.rnn, xg, loss_fn, engine="reference")
            g = xg.grad.abs().flatten(1).sum(1)  # (L,)
            # (fewer non-zero steps than visited is possible: a step whose gates saturate to
            # exactly 0 or 1 in float32 passes credit on through c with none for its input)
            if int((g > 0).sum()) > counts[-1]:
                print(f"  warning: {int((g > 0).sum())} steps with non-zero input gradient, "
                      f"only {counts[-1]} visited", flush=True)
            held.append(credit_steps(g))
        n = sum(counts) / len(counts)
        out[T] = {"steps": L, "visited": n, "loss": sum(losses) / len(losses),
                  "held": sum(held) / len(held),
                  "tol": {tol: {"visited": sum(v) / len(v), "grad_error": sum(e) / len(e),
                                "grad_error_max": max(e)} for tol, (v, e) in approx.items()}}
        print(f"  {Path(run).name} (step {ckpt.get('step', '?')})  T={T:5d}  {n:8.1f} of {L} "
              f"steps ({n / L:.1%}), 99.9% of the credit in {out[T]['held']:.1f}, loss "
              f"{out[T]['loss']:.4g}", flush=True)
        for tol, r in out[T]["tol"].items():
            print(f"    credit_tol {tol:g}: {r['visited']:8.1f} steps ({r['visited'] / L:.1%}), "
                  f"gradient error {r['grad_error']:.2%} (at most {r['grad_error_max']:.2%})",
                  flush=True)
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
    p.add_argument("--runs", nargs="+", default=[],
                   help="also count for these trained adding or copying runs (run directories)")
    p.add_argument("--credit-tol", type=float, nargs="+", default=[],
                   help="with --runs: also measure the sparse engine's credit_tol approximation")
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
    for run in args.runs:
        got = run_visited(run, args.T, args.seqs, args.credit_tol)
        copying = got[args.T[0]]["steps"] > args.T[0]  # T + 20 steps
        what = ("copying sequences, loss at the last recalled digit (cross-entropy)" if copying
                else "adding sequences, loss at the last step (MSE)")
        print(f"\nThe same for the trained model of {run}: {what}; mean of {args.seqs} "
              "sequences")
        print(fmt_table(["T", "BPTT steps", "SAB visited", "fraction", "99.9% of the credit in",
                         "fraction", "loss"],
                        [[T, r["steps"], f"{r['visited']:.0f}", f"{r['visited'] / r['steps']:.1%}",
                          f"{r['held']:.0f}", f"{r['held'] / r['steps']:.1%}", f"{r['loss']:.4g}"]
                         for T, r in got.items()]))
        if args.credit_tol:
            print(f"\nThe sparse engine's credit_tol approximation on the same sequences (cut "
                  f"off memories with credit below TOL of the largest; not SAB's rule): steps "
                  f"visited and the parameter gradient's relative error ‖g_tol − g‖ / ‖g‖ "
                  f"(mean, max over the {args.seqs} sequences)")
            print(fmt_table(["T", "credit_tol", "visited", "fraction", "gradient error",
                             "max"],
                            [[T, f"{tol:g}", f"{a['visited']:.0f}",
                              f"{a['visited'] / r['steps']:.1%}", f"{a['grad_error']:.2%}",
                              f"{a['grad_error_max']:.2%}"]
                             for T, r in got.items() for tol, a in r["tol"].items()]))
        results.setdefault("runs", {})[run] = got
    finish(args, results)
    return results


if __name__ == "__main__":
    main()
