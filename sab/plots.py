"""Plots of a run directory: learning curves and the attention map (PNG files).

``plot_run(DIR)`` writes

* ``DIR/curves.png`` — training loss, the task's evaluation metrics, and the hidden-state and
  gradient norms against the step (from ``metrics.jsonl``);
* ``DIR/attention.png`` — for a model with memory, the sparse attention weights of one evaluation
  sequence as a heatmap: one row per memory (labelled by the step that wrote it), one column per
  step, the weight with which that step read that memory (the paper's figure).  On copying, a
  trained SAB's recall steps (the last 10 columns) read the memories written among the first 10
  steps, where the digits were.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["plot_run", "plot_curves", "plot_attention", "attention_matrix"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    return plt


def plot_curves(metrics: List[dict], path, title: str = "") -> Path:
    """Learning curves from metrics lines; returns the PNG's path."""
    plt = _pyplot()
    path = Path(path)
    keys = [k for k in ("train_loss",) + tuple(sorted({k for m in metrics for k in m
                                                       if k.startswith("eval_")}))]
    norms = [k for k in ("h_norm", "c_norm", "grad_norm", "grad_norm_max")
             if any(m.get(k) is not None for m in metrics)]
    panels = keys + (["norms"] if norms else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    for ax, key in zip(axes[0], panels):
        series = norms if key == "norms" else [key]
        for k in series:
            pts = [(m["step"], m[k]) for m in metrics if m.get(k) is not None]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=k)
        ax.set_xlabel("step")
        ax.set_title(key)
        if key == "norms":
            ax.set_yscale("log")
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_compare(runs, path, metric: Optional[str] = None) -> Path:
    """One evaluation metric of several runs against the step, in one figure (e.g. a run and its
    variant with another engine or setting); ``metric`` defaults to the first run's task's main
    metric (``eval_acc``, ``eval_mse``, ``eval_bpc``).  Returns the PNG's path."""
    from .tasks import TASKS
    from .trainer import METRICS, RunConfig

    runs = [Path(r) for r in runs]
    if len(runs) < 2:
        raise ValueError(f"plot_compare takes two or more runs, got {len(runs)}")
    series = []
    for run in runs:
        if not (run / METRICS).exists():
            raise ValueError(f"{run} holds no {METRICS}: not a run directory")
        lines = [json.loads(x) for x in (run / METRICS).read_text().splitlines() if x.strip()]
        series.append((run, lines))
    if metric is None:
        config = RunConfig.load(runs[0] / "config.json")
        metric = f"eval_{TASKS[config.task].main_metric}"
    metric = metric if metric.startswith("eval_") or metric == "train_loss" else f"eval_{metric}"
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = 0
    for run, lines in series:
        pts = [(m["step"], m[metric]) for m in lines if m.get(metric) is not None]
        if pts:
            ax.plot(*zip(*pts), marker=".", ms=3, label=f"{run.parent.name}/{run.name}")
            drawn += 1
    if not drawn:
        plt.close(fig)
        raise ValueError(f"no run logged {metric}")
    if metric.endswith(("mse", "ce", "ce10", "loss")):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_matrix(record, sample: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(memories × steps) weights of one sequence from an AttentionRecord (time-major), and the
    write step of each row.  Rows are the memories read with a positive weight at least once, in
    write order.  A memory selected at weight 0 (its score equals δ, the (k_top+1)-th largest,
    SPEC §2.4) is left out: which of several tied memories top-k picks depends on the kernel and
    the thread count, so keeping them would make the rows, and the drawn map, vary from machine
    to machine."""
    w = record.weights[:, sample]  # (T, K)
    steps = record.memory_steps[:, sample]  # (T, K), -1: padding
    T = w.shape[0]
    read = (steps >= 0) & (w > 0)  # (T, K)
    written = torch.unique(steps[read])  # (n,) sorted write steps
    mat = torch.zeros(len(written), T)  # (n, T)
    row = torch.searchsorted(written, steps.clamp_min(0))  # (T, K)
    for t in range(T):
        mat[row[t, read[t]], t] += w[t, read[t]].float()
    return mat, written


def plot_attention(record, path, sample: int = 0, title: str = "",
                   marks: Optional[dict] = None) -> Path:
    """Heatmap of ``attention_matrix``; ``marks`` = {label: step} draws guide lines."""
    plt = _pyplot()
    path = Path(path)
    mat, written = attention_matrix(record, sample)
    fig, ax = plt.subplots(figsize=(8, 6))
    if mat.numel() == 0:
        ax.text(0.5, 0.5, "no memory was read", ha="center", va="center")
    else:
        im = ax.imshow(mat.numpy(), aspect="auto", cmap="gray_r", interpolation="nearest",
                       vmin=0, vmax=1, origin="upper",
                       extent=(-0.5, mat.shape[1] - 0.5, len(written) - 0.5, -0.5))
        fig.colorbar(im, ax=ax, label="attention weight")
        ticks = list(range(0, len(written), max(1, len(written) // 12)))
        ax.set_yticks(ticks)
        ax.set_yticklabels([str(int(written[i])) for i in ticks])
        for i, (label, step) in enumerate((marks or {}).items()):
            ax.axvline(step - 0.5, color="tab:red", lw=0.8, ls="--")
            ax.text(step - 0.5, -0.5, f" {label}", color="tab:red", fontsize=8, rotation=90,
                    va="top", ha="right" if i % 2 == 0 else "left")
    ax.set_xlabel("step t (reading)")
    ax.set_ylabel("memory (step that wrote it)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir, sample: int = 0, T: Optional[int] = None,
             attention_path=None) -> List[Path]:
    """Write the run's curves and (for models with memory) its attention map; return the paths.

    ``T``: draw only the attention, on a sequence of length ``T`` instead of the run's own (a
    model trained at one copying length, read at another), into ``attention_path``."""
    from .trainer import METRICS, load_run

    run_dir = Path(run_dir)
    config, task, model, ckpt = load_run(run_dir)
    written = []
    metrics_path = run_dir / METRICS
    if T is None and metrics_path.exists():
        lines = [json.loads(x) for x in metrics_path.read_text().splitlines() if x.strip()]
        m = config.model
        title = (f"{config.task} T={config.task_options.get('T')}  {m.name} H={m.hidden} "
                 f"k_trunc={m.k_trunc} k_top={m.k_top} k_att={m.k_att}")
        written.append(plot_curves(lines, run_dir / "curves.png", title))
    if getattr(model.rnn, "attends", False):
        generator = task.eval_generator()
        x, y, _ = task.sample(max(sample + 1, 1), generator, T)  # (L, b, I)
        with torch.no_grad():
            _, _, records = model(x, None, return_attention=True)
        marks = {}
        trained_T = config.task_options.get("T")
        if config.task == "copy":
            L = trained_T if T is None else T
            marks = {"marker": L + 9, "recall": L + 10}
        acc = ""
        if config.task == "copy":
            logits = model.readout(*_outputs(model, x))
            acc = f"  (this sequence: {int((logits[-10:, sample].argmax(-1) == y[-10:, sample]).sum())}/10 digits recalled)"
        where = "" if T is None else f", trained at T={trained_T}, read at T={T}"
        path = run_dir / "attention.png" if attention_path is None else Path(attention_path)
        written.append(plot_attention(records[-1], path, sample,
                                      title=f"{model.rnn.__class__.__name__} attention at step "
                                            f"{ckpt['step']}{where}{acc}", marks=marks))
    return written


@torch.no_grad()
def _outputs(model, x):
    out, _, records = model(x, None, return_attention=True)
    return out, records[-1].summary
