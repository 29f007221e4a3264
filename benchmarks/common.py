"""What the benchmarks share: the machine description, the methods compared, a training step."""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import sab
from sab import native
from sab.cli import _positive_int
from sab.engines import forward_backward
from sab.heads import SequenceModel
from sab.naive import naive_forward
from sab.tasks import copying_batch, encode_copying
from sab.trainer import CKPT, CONFIG, RunConfig, Trainer

H, B = 128, 64
K_TRUNC, K_TOP, K_ATT = 5, 5, 2


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} cores{dev}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread(s); python {platform.python_version()}; "
            f"{native.describe()}")


@dataclass
class Method:
    """One way to train: a model and how one step is run."""
    name: str
    model: str  # sab / lstm / tbptt / naive
    engine: str = "reference"
    scorer: str = "mlp"
    fused: bool = False
    # the credit rule: "blocked" (block_score_grad + delta_grad, what the reproduction rows and
    # the demo train with) or "spec" (SPEC §3's default: the scores' credit reaches the states)
    credit: str = "blocked"
    fast_path: bool = True  # SABLSTM.fast_path: the reference engine's one-node layer (sab.fused)

    def build(self, input_size: int, k_att: int, device, hidden: int = H) -> SequenceModel:
        if self.model in ("sab", "naive"):
            blocked = self.credit == "blocked"
            rnn = sab.SABLSTM(input_size, hidden, k_trunc=K_TRUNC, k_top=K_TOP, k_att=k_att,
                              scorer=self.scorer, fused_scorer=self.fused,
                              block_score_grad=blocked, delta_grad=blocked)
            rnn.fast_path = self.fast_path
        elif self.model == "tbptt":
            rnn = sab.TBPTTLSTM(input_size, hidden, k_trunc=K_TRUNC)
        else:
            rnn = sab.build_rnn(self.model, input_size, hidden)
        return SequenceModel(rnn, 10).to(device)


METHODS = {m.name: m for m in [
    Method("lstm", "lstm"),
    Method("tbptt", "tbptt"),
    Method("sab-ref", "sab", "reference"),
    Method("sab-ref-generic", "sab", "reference", fast_path=False),
    Method("sab-ref-spec", "sab", "reference", credit="spec"),
    Method("sab-sparse", "sab", "sparse"),
    Method("sab-ref-fused", "sab", "reference", fused=True),
    Method("sab-sparse-fused", "sab", "sparse", fused=True),
    Method("sab-sparse-dot", "sab", "sparse", scorer="dot"),
    Method("naive", "naive"),
]}


def copying_data(T: int, batch: int, device, seed: int = 0):
    x, y = copying_batch(T, batch, torch.Generator().manual_seed(seed))  # (T+20, B)
    return encode_copying(x, one_hot=False).to(device), y.to(device)


def make_step(method: Method, T: int, batch: int = B, k_att: int = K_ATT, device="cpu",
              hidden: int = H) -> Callable[[], float]:
    """A closure running one training step (forward, backward, Adam) on a copying batch.

    Where the gradient is not finite (SPEC §3's credit can overflow at long T) Adam skips the
    update, so that the next steps time a finite model (NaN parameters send the ranking down
    its fallback and the timing means nothing); ``step.nonfinite`` counts those steps."""
    torch.manual_seed(0)
    model = method.build(1, k_att, device, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = copying_data(T, batch, device)
    L = y.shape[0]

    def loss_fn(start, stop, output, summary):
        logits = model.readout(output, summary)  # (w, B, 10)
        return F.cross_entropy(logits.reshape(-1, 10), y[start:stop].reshape(-1),
                               reduction="sum") / (L * batch)

    def step() -> dict:
        opt.zero_grad(set_to_none=True)
        if method.model == "naive":  # the authors' way: dense attention, the whole graph
            out, _, _, _, sums = naive_forward(model.rnn, x)
            loss = loss_fn(0, L, out, sums[-1])
            loss.backward()
            stats = {"steps_backpropagated": L}
        else:
            res = forward_backward(model.rnn, x, loss_fn, engine=method.engine)
            stats = res.stats
        if torch.isfinite(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)):
            opt.step()
        else:
            step.nonfinite += 1
        return stats

    step.nonfinite = 0
    return step


def timed(fn, repeats: int, warmup: int = 1, sync=None) -> float:
    """Best of ``repeats`` wall times after ``warmup`` calls (seconds)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def trainer_at_checkpoint(run: str, threads: int):
    """(trainer, checkpoint) of a run directory, on the CPU with ``threads`` torch threads (the
    benchmark's, not the run's own), resumed at its checkpoint: the model, optimizer, data stream
    position and carried state as the next step would see them."""
    config = RunConfig.load(f"{run}/{CONFIG}")
    config.train.device = "cpu"
    config.train.threads = threads  # Trainer applies it
    trainer = Trainer(config, None)
    ckpt = torch.load(f"{run}/{CKPT}", map_location="cpu", weights_only=False)
    trainer.load_checkpoint(ckpt)
    return trainer, ckpt


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=_positive_int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", help="also write the raw results to this JSON file")
    return p


def finish(args, results: dict) -> None:
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), **results}, f, indent=1)


def fmt_table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep] + [line(r) for r in rows])
