"""Where a trained SAB run's gradient goes, with the threshold δ constant and with its gradient.

Loads a run directory's checkpoint (``sab train`` / ``sab repro run``), draws the next training
batches of its own data stream and prints, for each batch and each rule, the gradient norm of
every parameter group (before clipping) — with ``block_score_grad`` the scores' gradient reaches
the scorer's parameters alone, so the scorer's rows show what δ's rule changes — and how much of
the attention sits on near-ties at the last ten steps (weights summing to less than 0.5).

    python -m benchmarks.score_grad --run results/benchmarks/const_delta_step43479 --batches 3
"""
from __future__ import annotations

import torch

from sab.engines import forward_backward
from sab.trainer import CONFIG, RunConfig

from .common import base_parser, finish, fmt_table, machine, trainer_at_checkpoint


def _groups(model) -> dict:
    """Parameter group -> its parameters: the scorer's v, its other parameters, the rest."""
    groups = {"scorer v": [], "scorer W_q, b, W_k": [], "LSTM, head, embedding": []}
    for name, p in model.named_parameters():
        if ".scorers." in f".{name}":
            groups["scorer v" if name.endswith(".v") else "scorer W_q, b, W_k"].append(p)
        else:
            groups["LSTM, head, embedding"].append(p)
    return groups


def _norm(params) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0


def main(argv=None) -> dict:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run directory with config.json and ckpt.pt")
    p.add_argument("--batches", type=int, default=3)
    args = p.parse_args(argv)
    config = RunConfig.load(f"{args.run}/{CONFIG}")  # checked before the data and checkpoint load
    if config.model.name != "sab" or not config.model.block_score_grad:
        raise SystemExit("score_grad: needs a SAB run trained with block_score_grad")
    trainer, ckpt = trainer_at_checkpoint(args.run, args.threads)
    config = trainer.config  # resolved
    model, layer = trainer.model, trainer.model.rnn
    chunks = [next(trainer.stream) for _ in range(args.batches)]
    groups = _groups(model)
    v_norm = float(torch.stack([sc.v.detach().norm() for sc in layer.scorers
                                if hasattr(sc, "v")]).norm())
    rows, results = [], []
    for delta_grad in (False, True):
        layer.delta_grad = delta_grad
        for i, chunk in enumerate(chunks):
            model.zero_grad(set_to_none=True)
            res = forward_backward(layer, model.encode(chunk.x),
                                   trainer.task.loss_fn(chunk, model.readout), None,
                                   engine="reference", return_attention=True)
            norms = {g: _norm(ps) for g, ps in groups.items()}
            weights = res.attention[-1].weights[-10:]  # (10, B, k_top) of the top layer
            ties = float((weights.sum(-1) < 0.5).float().mean())
            rows.append(["variable" if delta_grad else "constant", i, f"{res.loss.item():.4f}"]
                        + [f"{n:.3g}" for n in norms.values()] + [f"{ties:.2f}"])
            results.append({"delta_grad": delta_grad, "batch": i, "loss": res.loss.item(),
                            **norms, "near_ties_last10": ties})
    layer.delta_grad = config.model.delta_grad
    print(f"run {args.run}, checkpoint of step {ckpt['step']}; |v| = {v_norm:.1f}")
    print(machine())
    print(fmt_table(["δ", "batch", "loss"] + [f"|grad| {g}" for g in groups]
                    + ["near-ties, last 10 steps"], rows))
    out = {"run": args.run, "step": ckpt["step"], "v_norm": v_norm, "rows": results}
    finish(args, out)
    return out


if __name__ == "__main__":
    main()
