"""A model-agnostic trainer: configs, the training loop, checkpoints, metrics, data parallelism.

Reads top to bottom:

1. Configs.  Each component owns its defaults (minGPT style): the task's ``Task.Config``
   (``sab.tasks``), :class:`ModelConfig` and :class:`TrainConfig` here.  :class:`RunConfig`
   composes them; the command line overrides single fields, and the resolved config is written to
   the run directory as ``config.json`` (``sab train --config`` reads it back).
2. :class:`Trainer`.  One optimizer step per chunk of the task's stream: ``forward_backward`` with
   the chosen engine (``sab.engines``), gradients averaged over processes, the norm clipped, Adam.
   Every ``eval_every`` steps: evaluate, append a JSON line to ``metrics.jsonl``.  Every
   ``ckpt_every`` steps and at the end: a checkpoint, written atomically.
3. Resume.  If the run directory holds ``ckpt.pt``, the run continues from it by itself: model,
   optimizer, step, RNG states, the data position and the metrics written so far — so a run killed
   at any moment and restarted with the same command ends exactly as an uninterrupted one.
4. Non-finite loss or gradient: the run stops (``NonFiniteLoss``) naming the step; the last good
   checkpoint is left as it was.

Run directory::

    DIR/config.json     the resolved config (all three parts)
    DIR/cmd.txt         every command line that ran in DIR, one per line
    DIR/metrics.jsonl   one JSON object per evaluation: step, time, train loss, eval metrics,
                        hidden-state and gradient norms
    DIR/ckpt.pt         the latest checkpoint (ckpt.pt.tmp while it is written)
    DIR/*.png           plots (``sab plot``)

Data parallelism (``torchrun --nproc-per-node N -m sab train ...``): every process draws the
global batch from the same data generator and keeps its slice (``sab.tasks.SyntheticStream``),
so the processes' slices concatenated are the single-process batch.  With the reference engine
(one backward per step) the model is wrapped in ``DistributedDataParallel`` and DDP averages the
gradients during backward.  Other engines may call backward once per block, which DDP's reducer
does not allow within one forward; for them the unwrapped layer is run and the gradients are
all-reduced and averaged by hand after ``forward_backward`` — the same average.  Only rank 0
evaluates and writes files; the others wait at a barrier.
"""
from __future__ import annotations

import inspect
import json
import math
import os
import platform
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from . import native
from .engines import ENGINES, check_credit_tol, forward_backward
from .heads import SequenceModel
from .models import MODELS, build_rnn, model_arguments
from .tasks import EVAL_BLOCK, TASKS, Task, derive_seed

__all__ = ["ModelConfig", "TrainConfig", "RunConfig", "Trainer", "NonFiniteLoss", "ConfigError",
           "build_model", "load_run", "evaluate_run", "hardware_info", "hardware_summary",
           "CKPT", "CONFIG", "METRICS", "EVALS"]

CKPT, CONFIG, METRICS, CMD = "ckpt.pt", "config.json", "metrics.jsonl", "cmd.txt"
EVALS = "eval.jsonl"


class ConfigError(ValueError):
    """A bad config value or file; the message says which field and what is allowed."""


class NonFiniteLoss(RuntimeError):
    """Training produced a non-finite loss or gradient; ``step`` is the step that failed."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


# -- 1. configs --------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = "sab"  # one of sab.MODELS: sab, lstm, tbptt, selfattn
    hidden: int = 128
    num_layers: int = 1
    k_trunc: int = 5  # sab, tbptt
    k_top: int = 5  # sab
    k_att: int = 2  # sab
    att_hidden: Optional[int] = None  # sab, selfattn (default: hidden)
    scorer: str = "mlp"  # sab, selfattn: "mlp" (SPEC §2.3), "dot", "release" (comparison only)
    dropout: float = 0.0  # between layers
    fused_scorer: bool = False  # sab: torch.compile'd ranking kernel
    att_eps: float = 0.0  # sab: ε of w = ã / (Σã + ε); 0 = exact normalisation
    block_score_grad: bool = False  # sab, selfattn: scores send gradient to the scorer only
    delta_grad: bool = False  # sab, with block_score_grad: δ's gradient reaches the scorer
    max_memories: Optional[int] = None  # sab, selfattn: memories kept per layer (None: all)
    embed: int = 64  # tasks with token inputs (ptb, text8): embedding size


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 64  # the global batch (split over processes)
    lr: float = 1e-3  # Adam
    lr_schedule: str = "constant"  # or "cosine": lr·½(1 + cos(π·step/steps)), down to ~0 at the end
    clip: float = 1.0  # gradient-norm clip; 0 turns clipping off (the norm is still logged)
    eval_every: int = 200
    ckpt_every: int = 200
    # evaluation batch: memory only; the fixed evaluation set is drawn in blocks of
    # sab.tasks.EVAL_BLOCK sequences whatever it is (Task.eval_batches)
    eval_batch: int = 128
    seed: int = 0
    engine: str = "reference"  # one of sab.engines.ENGINES
    credit_tol: float = 0.0  # sparse engine only: drop negligible credit (not SAB's rule; 0: exact;
    # with several processes each one cuts on its own slice of the batch)
    threads: int = 1  # torch.set_num_threads on CPU; two 1-thread runs beat one 2-thread run
    device: str = "auto"  # auto (cuda if available), cpu, cuda


@dataclass
class RunConfig:
    task: str = "copy"
    task_options: Dict[str, Any] = field(default_factory=dict)  # the task's Config fields
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def resolved(self) -> "RunConfig":
        """Check every field; fill in the task's defaults.  Raises ConfigError."""
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {sorted(TASKS)}, got {self.task!r}")
        task_fields = {f.name: f for f in fields(TASKS[self.task].Config)}
        unknown = sorted(set(self.task_options) - set(task_fields))
        if unknown:
            raise ConfigError(f"task {self.task!r} has no option {', '.join(unknown)}; it has "
                              f"{', '.join(sorted(task_fields))}")
        options = asdict(TASKS[self.task].Config(**self.task_options))
        m, t = self.model, self.train
        if m.name not in MODELS:
            raise ConfigError(f"model must be one of {sorted(MODELS)}, got {m.name!r}")
        if t.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {sorted(ENGINES)}, got {t.engine!r}")
        try:
            check_credit_tol(t.credit_tol)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if t.engine == "sparse" and m.name != "sab":
            raise ConfigError(f"engine 'sparse' trains SAB models; model {m.name!r} trains with "
                              "engine 'reference'")
        if t.credit_tol and t.engine != "sparse":
            raise ConfigError(f"credit_tol={t.credit_tol} needs engine 'sparse' (the "
                              f"{t.engine} engine computes the exact gradient)")
        if t.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be auto, cpu or cuda, got {t.device!r}")
        try:
            TASKS[self.task].validate(TASKS[self.task].Config(**options))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        for name in ("steps", "batch_size", "eval_every", "ckpt_every", "eval_batch", "threads",
                     "hidden", "num_layers", "k_trunc", "k_att", "embed"):
            value = getattr(t if hasattr(t, name) else m, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if m.max_memories is not None and (not isinstance(m.max_memories, int)
                                           or isinstance(m.max_memories, bool)
                                           or m.max_memories < 1):
            raise ConfigError(f"max_memories must be an integer >= 1 or null, got "
                              f"{m.max_memories!r}")
        for name in ("block_score_grad", "fused_scorer", "delta_grad"):
            value = getattr(m, name, None)
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{name} must be true or false, got {value!r}")
        if m.delta_grad and not m.block_score_grad:
            raise ConfigError("delta_grad needs block_score_grad: δ's gradient may reach the "
                              "scorer's parameters only, never a memory (SPEC §3)")
        if not isinstance(m.k_top, int) or m.k_top < 0:
            raise ConfigError(f"k_top must be an integer >= 0, got {m.k_top!r}")
        for name, value in (("lr", t.lr), ("clip", t.clip)):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if t.lr == 0:
            raise ConfigError("lr must be > 0")
        if t.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got "
                              f"{t.lr_schedule!r}")
        return RunConfig(self.task, options, m, t)

    def to_dict(self) -> dict:
        return {"task": {"name": self.task, **self.task_options}, "model": asdict(self.model),
                "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict, where: str = "config") -> "RunConfig":
        """The inverse of :meth:`to_dict`; every unknown or missing key is a ConfigError."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object with keys task, model, train; "
                              f"got {type(d).__name__}")
        unknown = sorted(set(d) - {"task", "model", "train"})
        if unknown:
            raise ConfigError(f"{where}: unknown section {', '.join(unknown)} (sections: task, "
                              f"model, train)")
        task = dict(d.get("task", {}))
        if not isinstance(task, dict) or "name" not in task:
            raise ConfigError(f"{where}: section 'task' must be an object with a 'name'")
        name = task.pop("name")
        parts = {}
        for section, cls_ in (("model", ModelConfig), ("train", TrainConfig)):
            values = d.get(section, {})
            if not isinstance(values, dict):
                raise ConfigError(f"{where}: section {section!r} must be an object")
            allowed = {f.name for f in fields(cls_)}
            bad = sorted(set(values) - allowed)
            if bad:
                raise ConfigError(f"{where}: section {section!r} has no field {', '.join(bad)}; "
                                  f"it has {', '.join(sorted(allowed))}")
            parts[section] = cls_(**values)
        return cls(name, task, parts["model"], parts["train"])

    @classmethod
    def load(cls, path) -> "RunConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
        return cls.from_dict(d, where=str(path))


def build_model(config: RunConfig, task: Task) -> SequenceModel:
    """The recurrent layer named by ``config.model.name`` with the fields it takes, and the head;
    an embedding of ``config.model.embed`` dimensions in front when the task feeds token ids."""
    m = config.model
    given = {"k_trunc": m.k_trunc, "k_top": m.k_top, "k_att": m.k_att, "num_layers": m.num_layers,
             "att_hidden": m.att_hidden, "scorer": m.scorer, "dropout": m.dropout,
             "fused_scorer": m.fused_scorer, "max_memories": m.max_memories,
             "att_eps": m.att_eps, "block_score_grad": m.block_score_grad,
             "delta_grad": m.delta_grad}
    takes = set(model_arguments(m.name))
    embedding = nn.Embedding(task.input_vocab, m.embed) if task.input_vocab else None
    rnn = build_rnn(m.name, m.embed if embedding is not None else task.input_size, m.hidden,
                    **{k: v for k, v in given.items() if k in takes})
    return SequenceModel(rnn, task.output_size, embedding)


def _device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda asked for, but CUDA is not available")
    if name == "cuda" and dist.is_initialized():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(name)


def load_run(run_dir, device: str = "cpu", task_options: Optional[dict] = None):
    """(config, task, model with the checkpoint's weights, checkpoint) of a run directory.
    ``task_options`` override the saved task options (e.g. ``data_dir``, ``eval_split``).
    On the CPU the C++ step functions are built here (the first time, about a minute), so that
    a caller that times an evaluation (``sab eval``, ``sab repro transfer``) does not time it."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise ConfigError(f"{run_dir} is not a run directory: it has no {CONFIG}")
    if not (run_dir / CKPT).exists():
        raise ConfigError(f"{run_dir} has no checkpoint {CKPT} yet")
    config = RunConfig.load(run_dir / CONFIG)
    config.task_options.update(task_options or {})
    config = config.resolved()
    task = TASKS[config.task](TASKS[config.task].Config(**config.task_options))
    model = build_model(config, task)
    ckpt = torch.load(run_dir / CKPT, map_location=device, weights_only=False)
    model.load_state_dict(ckpt["model"])
    if torch.device(device).type == "cpu":
        native.kernels()
    return config, task, model.to(device).eval(), ckpt


def hardware_info(device: str = "cpu", threads: Optional[int] = None) -> dict:
    """What a run ran on: CPU model and cores, threads, GPU (if the run used one), versions."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if device != "cpu" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"cpu": cpu or "unknown", "cores": os.cpu_count(), "threads": threads,
            "device": device, "gpu": gpu, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def hardware_summary(h: dict) -> str:
    """One line for a report: ``GPU <name>`` or ``<cpu>, N cores, M threads``, and torch."""
    where = f"GPU {h['gpu']}" if h.get("gpu") else \
        f"{h.get('cpu', '?')}, {h.get('cores', '?')} cores" + \
        (f", {h['threads']} thread{'s' if h['threads'] != 1 else ''}" if h.get("threads") else "")
    return f"{where}, torch {h.get('torch', '?')}"


def evaluate_run(run_dir, lengths: Optional[Sequence[int]] = None,
                 task_options: Optional[dict] = None, eval_batch: int = 64,
                 chunk_len: int = 1000,
                 on_row: Optional[Callable[[dict], None]] = None,
                 per_position: bool = False) -> List[dict]:
    """Evaluate a run's checkpoint and append one line per evaluation to its ``eval.jsonl``:
    at each length in ``lengths`` (tasks with a length T; ``None``: the trained T), or on the
    configured split (data tasks).  Each line holds the checkpoint's step, ``T`` and
    ``trained_T`` (or ``split``), ``eval_size``, ``eval_block`` (synthetic tasks: the blocks
    their set is drawn in; older lines without it drew it batch by batch, another sample), the
    task's metrics, the seconds the evaluation took (the C++ build is not in them:
    :func:`load_run` does it first) and the hardware.
    ``on_row`` is called with each line as it is written.  ``per_position`` (copying only)
    adds the accuracy and cross-entropy at each recalled digit."""
    run_dir = Path(run_dir)
    config, task, model, ckpt = load_run(run_dir, task_options=task_options)
    if per_position and "per_position" not in inspect.signature(task.evaluate).parameters:
        raise ConfigError(f"per_position: only the copying task has recalled digits to split "
                          f"by position, not task {config.task!r}")
    extra = {"per_position": True} if per_position else {}
    trained_T = config.task_options.get("T")
    if trained_T is None and lengths:
        raise ConfigError(f"task {config.task!r} has no length T to change")
    hw = hardware_summary(hardware_info("cpu", torch.get_num_threads()))
    rows = []
    for T in (lengths or [trained_T]):
        t0 = time.time()
        metrics = task.evaluate(model, T=T, batch_size=eval_batch, chunk_len=chunk_len, **extra)
        where = {"T": T, "trained_T": trained_T} if trained_T is not None else \
            {"split": task.config.eval_split}
        drawn = {"eval_block": EVAL_BLOCK} if task.draws_eval_set else {}  # how the set is drawn
        row = {"step": ckpt["step"], **where, "eval_size": task.config.eval_size, **drawn,
               **metrics, "seconds": round(time.time() - t0, 2), "hardware": hw}
        rows.append(row)
        if on_row:
            on_row(row)
        with open(run_dir / EVALS, "a") as f:
            f.write(json.dumps(row) + "\n")
    return rows


# -- distributed helpers -----------------------------------------------------------------------

def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (WORLD_SIZE > 1): nccl on GPU, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def shutdown_distributed(sync: bool = True) -> None:
    """Leave the process group, if one is joined.  With ``sync`` every rank first waits at a
    barrier, so that no rank tears down gloo's connections (or, on rank 0, the TCP store the
    others hold) while another still works; pass ``sync=False`` on an error path, where a peer
    may never arrive."""
    if dist.is_available() and dist.is_initialized():
        if sync:
            dist.barrier()
        dist.destroy_process_group()


def _average_gradients(params, world: int) -> None:
    """All-reduce and average the gradients by hand (for engines DDP cannot wrap)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (P,)
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


# -- 2. the trainer ----------------------------------------------------------------------------

def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a reader sees the old or the new checkpoint, never half


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(t: "TrainConfig", step: int) -> float:
    """The learning rate of update ``step`` (0-based) under ``t.lr_schedule``."""
    if t.lr_schedule == "cosine":
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * min(step, t.steps) / t.steps))
    return t.lr


@contextmanager
def stop_on_signals(on_stop: Callable[[str], None]):
    """While inside, SIGINT and SIGTERM call ``on_stop(name)`` — the caller then stops after the
    current step with a checkpoint — and a second signal raises ``KeyboardInterrupt`` (the last
    checkpoint is kept).  Installed explicitly, so it also works for a job started in the
    background, where a non-interactive shell leaves SIGINT ignored."""
    fired = []

    def handler(signum, frame):
        if fired:
            raise KeyboardInterrupt
        fired.append(signal.Signals(signum).name)
        on_stop(fired[0])

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield fired
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Trainer:
    """``Trainer(config, out_dir).run()`` trains, evaluates, checkpoints and resumes.

    ``out_dir=None`` keeps everything in memory (tests, notebooks).  ``callbacks`` are called as
    ``cb(trainer, metrics)`` after each evaluation.  ``progress_position`` places the tqdm bar
    (two runs side by side in ``sab demo``).
    """

    def __init__(self, config: RunConfig, out_dir=None, *, command: Optional[str] = None,
                 callbacks=(), progress_position: int = 0, debug_nan_at_step: Optional[int] = None):
        self.config = config.resolved()
        self.out = Path(out_dir) if out_dir is not None else None
        if self.out is not None:
            _check_resumable(self.out, self.config.train.ckpt_every)
        self.command = command
        self.callbacks = list(callbacks)
        self.progress_position = progress_position
        self.debug_nan_at_step = debug_nan_at_step
        self.rank, self.world = _dist_info()
        t = self.config.train
        self.device = _device(t.device)
        if self.device.type == "cpu":
            torch.set_num_threads(t.threads)
        self.task = TASKS[self.config.task](TASKS[self.config.task].Config(
            **self.config.task_options))
        torch.manual_seed(derive_seed(t.seed, "model-init"))  # the same init on every rank
        self.model = build_model(self.config, self.task).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=t.lr)
        self.stream = self.task.train_stream(t.batch_size, t.seed, self.rank, self.world)
        torch.manual_seed(derive_seed(t.seed, "train-rng"))  # dropout etc.; checkpointed
        self.step = 0
        self.state = None  # the recurrent state carried between chunks (reset=False tasks)
        self.metrics_lines = 0  # lines of metrics.jsonl that belong to this run's history
        self.running = self._zero_running()
        self.history: list = []  # the metrics lines (also kept when out_dir is None)
        # set (e.g. by a signal handler) to end ``run`` after the current step with a checkpoint
        self.stop_requested = False
        self.deadline: Optional[float] = None  # time.time() past which ``run`` stops likewise
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            # DDP broadcasts rank 0's parameters and, with the reference engine, averages the
            # gradients during backward.  Other engines run the plain layer (see the module docs).
            self.ddp = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- bookkeeping ---------------------------------------------------------------------------
    @staticmethod
    def _zero_running() -> dict:
        return {"loss": 0.0, "n": 0, "grad_norm": 0.0, "grad_norm_max": 0.0, "h_norm": 0.0,
                "c_norm": 0.0, "backprop_fraction": 0.0, "memories_cut": 0, "t0_wall": 0.0}

    @property
    def is_writer(self) -> bool:
        return self.out is not None and self.rank == 0

    def _wall(self) -> float:
        return self.running["t0_wall"] + (time.time() - self._start)

    def checkpoint(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "rng": rng, "data": self.stream.state_dict(),
                "state": None if self.state is None else self.state.to("cpu"),
                "running": dict(self.running, t0_wall=self._wall()),
                "metrics_lines": self.metrics_lines, "config": self.config.to_dict()}

    def save_checkpoint(self) -> None:
        if self.is_writer:
            _atomic_save(self.checkpoint(), self.out / CKPT)
        self._barrier()

    def _barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        if "cuda" in ckpt["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        self.stream.load_state_dict(ckpt["data"])
        self.state = None if ckpt["state"] is None else ckpt["state"].to(self.device)
        self.running = dict(ckpt["running"])
        self.metrics_lines = ckpt["metrics_lines"]

    def _prepare_out_dir(self) -> bool:
        """Create the run directory or resume from it; returns whether it resumed."""
        resumed = False
        if self.out is not None:
            ckpt_path = self.out / CKPT
            if ckpt_path.exists():
                saved = RunConfig.load(self.out / CONFIG).resolved() \
                    if (self.out / CONFIG).exists() else None
                if saved is not None:
                    _check_same_run(saved, self.config, self.out)
                ckpt = torch.load(ckpt_path, map_location=self.device, weights_only=False)
                self.load_checkpoint(ckpt)
                resumed = True
        if self.is_writer:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / CONFIG).write_text(json.dumps(self.config.to_dict(), indent=2) + "\n")
            if self.command is not None:
                with open(self.out / CMD, "a") as f:
                    f.write(self.command + "\n")
            metrics = self.out / METRICS
            lines = metrics.read_text().splitlines(keepends=True) if metrics.exists() else []
            # lines past the checkpoint were written by the killed process after its last
            # checkpoint; they are written again, identically, as the run replays those steps
            metrics.write_text("".join(lines[:self.metrics_lines]))
            self.history = [json.loads(line) for line in lines[:self.metrics_lines]]
        self._barrier()
        return resumed

    # -- one step ------------------------------------------------------------------------------
    def train_step(self) -> dict:
        """One optimizer step on the next chunk; returns its loss and norms."""
        t = self.config.train
        chunk = next(self.stream)
        x, y = chunk.x.to(self.device), chunk.y.to(self.device)
        chunk = chunk._replace(x=x, y=y)
        if chunk.reset:
            self.state = None
        loss_fn = self.task.loss_fn(chunk, self.model.readout)
        if self.debug_nan_at_step == self.step + 1:  # hidden test hook: poison this step's loss
            inner = loss_fn

            def loss_fn(start, stop, output, summary):
                value = inner(start, stop, output, summary)
                return None if value is None else value * float("nan")
        self.optimizer.zero_grad(set_to_none=True)
        use_ddp = self.ddp is not None and t.engine == "reference"
        if use_ddp:  # DDP's forward is SequenceModel.forward, which embeds token inputs itself
            result = forward_backward(self.ddp, chunk.x, loss_fn, self.state, engine=t.engine,
                                      credit_tol=t.credit_tol)
        else:  # token ids (T, B) -> (T, B, E); the engines send x's gradient to the embedding
            result = forward_backward(self.model.rnn, self.model.encode(chunk.x), loss_fn,
                                      self.state, engine=t.engine, credit_tol=t.credit_tol)
        if self.ddp is not None and not use_ddp:
            _average_gradients(self.params, self.world)
        loss = result.loss.detach().to(torch.float64)
        if self.world > 1:  # the global batch's loss: the mean of the ranks' (equal) slices
            dist.all_reduce(loss)
            loss /= self.world
        loss = loss.item()
        if not math.isfinite(loss):
            raise NonFiniteLoss(f"non-finite training loss ({loss}) at step {self.step + 1}",
                                self.step + 1)
        grad_norm = nn.utils.clip_grad_norm_(self.params, t.clip if t.clip > 0 else float("inf"))
        grad_norm = grad_norm.item()
        if not math.isfinite(grad_norm):
            raise NonFiniteLoss(f"non-finite gradient norm ({grad_norm}) at step {self.step + 1} "
                                f"(loss {loss:.6g})", self.step + 1)
        for group in self.optimizer.param_groups:  # a function of the step: resumes exactly
            group["lr"] = learning_rate(t, self.step)
        self.optimizer.step()
        self.step += 1
        # the state after this chunk (detached by the engine) goes into the next one, unless the
        # task never carries it (every chunk is a fresh batch: nothing to keep in checkpoints);
        # a chunk with reset=True drops it before it runs (above)
        self.state = self.task.carry(result.state) if self.task.carries_state else None
        h, c = result.state.h, result.state.c  # (L, B, H)
        return {"loss": loss, "grad_norm": grad_norm, "h_norm": h.norm(dim=-1).mean().item(),
                "c_norm": c.norm(dim=-1).mean().item(),
                "backprop_fraction": result.stats["steps_backpropagated"] / result.stats["steps"],
                "memories_cut": result.stats.get("memories_cut", 0)}

    def evaluate(self, T: Optional[int] = None) -> dict:
        self.model.eval()
        try:
            return self.task.evaluate(self.model, T=T, batch_size=self.config.train.eval_batch)
        finally:
            self.model.train()

    def _log_eval(self) -> dict:
        r = self.running
        n = max(r["n"], 1)
        line = {"step": self.step, "time": round(self._wall(), 3),
                "train_loss": r["loss"] / n if r["n"] else None}
        metrics = self.evaluate() if self.rank == 0 else {}
        line.update({f"eval_{k}": v for k, v in metrics.items()})
        line.update({"grad_norm": r["grad_norm"] / n if r["n"] else None,
                     "grad_norm_max": r["grad_norm_max"] if r["n"] else None,
                     "h_norm": r["h_norm"] / n if r["n"] else None,
                     "c_norm": r["c_norm"] / n if r["n"] else None})
        if self.config.train.engine == "sparse":  # the share of cell steps backpropagated
            line["backprop_fraction"] = r["backprop_fraction"] / n if r["n"] else None
            if self.config.train.credit_tol:
                line["memories_cut"] = r["memories_cut"] / n if r["n"] else None
        if self.rank == 0:
            self.history.append(line)
            if self.is_writer:
                with open(self.out / METRICS, "a") as f:
                    f.write(json.dumps(line) + "\n")
        self.metrics_lines += 1
        self.running = dict(self._zero_running(), t0_wall=r["t0_wall"])
        self._barrier()
        for cb in self.callbacks:
            cb(self, line)
        return line

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        """Train to ``config.train.steps`` (resuming if a checkpoint exists); returns the last
        metrics line.  Raises NonFiniteLoss (the last good checkpoint is kept).  Setting
        ``stop_requested`` (or passing ``deadline``) ends the loop early after a checkpoint."""
        from tqdm import tqdm

        t = self.config.train
        self._start = time.time()
        resumed = self._prepare_out_dir()
        self.model.train()
        if not resumed and self.step == 0:
            self._log_eval()  # step 0: the untrained model, a baseline for the curves
        self._start = time.time()
        self.running["t0_wall"] = self.running.get("t0_wall", 0.0)
        bar = tqdm(total=t.steps, initial=self.step, position=self.progress_position,
                   desc=f"{self.config.model.name:>8}", dynamic_ncols=True, leave=True,
                   disable=self.rank != 0 or not sys.stderr.isatty())
        main = f"eval_{self.task.main_metric}"
        last = self.history[-1] if self.history else {}
        try:
            while self.step < t.steps:
                if self.stop_requested or (self.deadline is not None
                                           and time.time() >= self.deadline):
                    # stop early: the checkpoint holds everything (running sums included), so
                    # resuming continues exactly as if the run had not stopped
                    if self.step % t.ckpt_every != 0:
                        self.save_checkpoint()
                    break
                stats = self.train_step()
                r = self.running
                r["n"] += 1
                r["loss"] += stats["loss"]
                r["grad_norm"] += stats["grad_norm"]
                r["grad_norm_max"] = max(r["grad_norm_max"], stats["grad_norm"])
                r["h_norm"] += stats["h_norm"]
                r["c_norm"] += stats["c_norm"]
                for key in ("backprop_fraction", "memories_cut"):  # (older checkpoints lack them)
                    r[key] = r.get(key, 0) + stats[key]
                if self.step % t.eval_every == 0 or self.step == t.steps:
                    last = self._log_eval()
                    if bar.disable and self.rank == 0 and self.out is not None:
                        print(_format_line(last), flush=True)
                if self.step % t.ckpt_every == 0 or self.step == t.steps:
                    self.save_checkpoint()
                bar.update(1)
                post = {"loss": f"{stats['loss']:.4f}"}
                if main in last:
                    post[main[5:]] = f"{last[main]:.3f}"
                bar.set_postfix(post, refresh=False)
        finally:
            bar.close()
        return last


def _format_line(line: dict) -> str:
    parts = []
    for k, v in line.items():
        if v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return "  ".join(parts)


# fields that may change between a run and its resumption (they do not change the computation;
# the two engines compute the same gradients, tests/test_engines.py, to rounding)
_RESUMABLE = {("train", "steps"), ("train", "eval_every"), ("train", "ckpt_every"),
              ("train", "threads"), ("train", "eval_batch"), ("train", "engine"),
              ("task", "data_dir")}


def _check_resumable(out: Path, ckpt_every: int) -> None:
    """A run directory whose metrics go past its first checkpoint but that holds no checkpoint
    (deleted, or left out of git once finished) cannot resume, and starting over would erase
    its recorded metrics: refuse.  (Metrics only up to the first checkpoint are what a run
    killed before it leaves; that run starts over.)"""
    metrics = out / METRICS
    if (out / CKPT).exists() or not metrics.is_file():
        return
    steps = []
    for line in metrics.read_text().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    if steps and max(steps) > ckpt_every:
        raise ConfigError(
            f"{out} holds metrics up to step {max(steps):,} but no checkpoint {CKPT}: it cannot "
            f"resume, and training would start over and erase {METRICS}; put its {CKPT} back "
            f"(e.g. from git or the machine that trained it) or choose another --out")


def _check_same_run(saved: RunConfig, new: RunConfig, out: Path) -> None:
    a, b = saved.to_dict(), new.to_dict()
    for section in a:
        for key in set(a[section]) | set(b.get(section, {})):
            if (section, key) in _RESUMABLE:
                continue
            if a[section].get(key) != b[section].get(key):
                raise ConfigError(
                    f"{out} holds a run with {section}.{key} = {a[section].get(key)!r}, but this "
                    f"command asks for {b[section].get(key)!r}; resume with the same settings "
                    f"(only steps, eval_every, ckpt_every, threads, eval_batch, engine, data_dir may change) or "
                    f"choose another --out")
