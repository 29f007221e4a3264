"""Tasks: data generators, the loss callback the engines call, and the paper's metrics (SPEC §6).

Every generator draws from an explicit ``torch.Generator``: the data depend only on that
generator's seed, never on the global RNG that initialises the model, so changing the model (or
its seed) never changes the data, and a checkpoint can store the exact data position
(``generator.get_state()``).

A task is an object the trainer drives without knowing what it is::

    task = build_task("copy", T=100)                  # or TASKS["copy"](CopyingTask.Config(...))
    task.input_size, task.output_size                  # what the model and head are built for
    stream = task.train_stream(batch_size, seed)       # endless, checkpointable
    chunk = next(stream)                               # Chunk(x (T, B, I), y, reset=True)
    loss_fn = task.loss_fn(chunk, readout)             # the engines' callback (sab.engines)
    metrics = task.evaluate(model, T=None)             # {"acc": ..., "ce10": ..., "ce": ...}

``reset`` says whether the carried recurrent state must be dropped before the chunk (a new batch of
sequences) or kept (the next window of the same streams, as language modelling will need: the
trainer then carries ``result.state``, detached, into the next chunk).

Copying (paper format), time-major, length T+20::

    input : d1 … d10  0 … 0 (T−1 blanks)  9  0 … 0 (10 blanks)      digits d_i uniform in {1..8}
    target: 0 … 0 (T+10 blanks)              d1 … d10

Adding: two inputs per step, a value ~ U[0, 1] and a marker (1 at one step in each half, 0
elsewhere); the target, read at the last step, is the sum of the two marked values (or their mean,
the authors' variant).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Chunk", "CopyingTask", "AddingTask", "TASKS", "build_task", "copying_batch",
           "adding_batch", "derive_seed", "encode_copying", "SyntheticStream"]

N_DIGITS = 10  # digits to copy (SPEC §6)
N_SYMBOLS = 10  # 0 blank, 1..8 digits, 9 marker
BLANK, MARKER = 0, 9

Readout = Callable[[Tensor, Tensor], Tensor]  # (output, summary) (T, B, H) -> (T, B, out)


class Chunk(NamedTuple):
    x: Tensor  # (T, B, input_size)
    y: Tensor  # targets, task-specific shape
    reset: bool  # drop the carried state before this chunk


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for stream ``name`` derived from ``seed``: independent streams per purpose
    (training data, evaluation data, model initialisation) from one user-facing seed."""
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# -- generators --------------------------------------------------------------------------------

def copying_batch(T: int, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Symbols of a copying batch, time-major: input and target, both (T+20, B) int64."""
    if T < 1:
        raise ValueError(f"copying needs T >= 1, got {T}")
    digits = torch.randint(1, 9, (N_DIGITS, batch), generator=generator)  # (10, B) in {1..8}
    x = torch.full((T + 2 * N_DIGITS, batch), BLANK, dtype=torch.long)  # (T+20, B)
    x[:N_DIGITS] = digits
    x[N_DIGITS + T - 1] = MARKER  # after T-1 blanks
    y = torch.full_like(x, BLANK)  # (T+20, B)
    y[T + N_DIGITS:] = digits
    return x, y


def encode_copying(symbols: Tensor, one_hot: bool) -> Tensor:
    """(L, B) int symbols -> (L, B, 1) float, the symbol's value as the authors' code feeds it
    (0 … 9, unscaled), or (L, B, 10) one-hot."""
    if one_hot:
        return F.one_hot(symbols, N_SYMBOLS).float()  # (L, B, 10)
    return symbols.float().unsqueeze(-1)  # (L, B, 1)


def adding_batch(T: int, batch: int, generator: torch.Generator,
                 target: str = "sum") -> tuple[Tensor, Tensor]:
    """An adding batch: input (T, B, 2) = [value ~ U[0,1], marker], target (B,)."""
    if T < 2:
        raise ValueError(f"adding needs T >= 2 (one marker in each half), got {T}")
    if target not in ("sum", "mean"):
        raise ValueError(f"adding target must be 'sum' or 'mean', got {target!r}")
    half = T // 2
    values = torch.rand(T, batch, generator=generator)  # (T, B)
    first = torch.randint(0, half, (batch,), generator=generator)  # (B,) in [0, T/2)
    second = torch.randint(half, T, (batch,), generator=generator)  # (B,) in [T/2, T)
    marker = torch.zeros(T, batch)  # (T, B)
    cols = torch.arange(batch)
    marker[first, cols] = 1.0
    marker[second, cols] = 1.0
    y = values[first, cols] + values[second, cols]  # (B,)
    if target == "mean":
        y = y / 2
    return torch.stack([values, marker], dim=-1), y  # (T, B, 2), (B,)


class SyntheticStream:
    """Endless training batches from a generator; ``state_dict`` is the exact data position.

    Data-parallel: every rank draws the *global* batch from the same generator and keeps its own
    slice, so the ranks' slices concatenated are exactly the single-process batch.
    """

    def __init__(self, make: Callable[[int, torch.Generator], Chunk], batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of "
                             f"processes {world_size}")
        self.make, self.batch_size = make, batch_size
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(derive_seed(seed, "train-data"))
        self.batches = 0

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        x, y, reset = self.make(self.batch_size, self.generator)
        self.batches += 1
        if self.world_size == 1:
            return Chunk(x, y, reset)
        local = self.batch_size // self.world_size
        sl = slice(self.rank * local, (self.rank + 1) * local)
        return Chunk(x[:, sl], y[..., sl] if y.dim() == 1 else y[:, sl], reset)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.batches = state["batches"]


# -- task base ---------------------------------------------------------------------------------

class Task:
    """What the trainer needs from a task (see the module docs)."""

    name: str
    Config: type
    input_size: int
    output_size: int
    main_metric: str  # the metric shown in progress bars and tables

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self._check()

    def _check(self) -> None:
        pass

    def sample(self, batch: int, generator: torch.Generator, T: Optional[int] = None) -> Chunk:
        raise NotImplementedError

    def train_stream(self, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1) -> SyntheticStream:
        return SyntheticStream(lambda b, g: self.sample(b, g), batch_size, seed, rank, world_size)

    def eval_generator(self) -> torch.Generator:
        """The evaluation set's generator: a fixed seed, the same for every run and model."""
        return torch.Generator().manual_seed(derive_seed(self.config.eval_seed, "eval-data"))

    def loss_fn(self, chunk: Chunk, readout: Readout):
        """The engines' callback ``loss(start, stop, output, summary)`` for this chunk."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, T: Optional[int] = None, batch_size: int = 128,
                 chunk_len: int = 1000) -> Dict[str, float]:
        raise NotImplementedError


def _device_of(model: nn.Module) -> torch.device:
    """Where the model lives: evaluation data are generated on the CPU and moved there."""
    return next(model.parameters()).device


def _check_positive(name: str, value, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _run_chunks(model: nn.Module, x: Tensor, chunk_len: int):
    """Run ``model`` (a SequenceModel) over ``x`` (L, B, I) in windows of ``chunk_len`` steps with
    the state carried (no graph): yields (start, stop, output, summary) per window, so evaluation
    at T = 5000 holds one window's activations at a time plus the memory."""
    state = None
    for start in range(0, x.shape[0], chunk_len):
        stop = min(x.shape[0], start + chunk_len)
        output, state, records = model(x[start:stop], state, return_attention=True)
        yield start, stop, output, records[-1].summary  # (w, B, H) each


# -- copying -----------------------------------------------------------------------------------

class CopyingTask(Task):
    """The copying memory task in the paper's format (SPEC §6): CE over all T+20 positions.

    Metrics: ``acc`` — accuracy on the 10 recalled digits; ``ce10`` — mean cross-entropy over those
    10 positions; ``ce`` — mean cross-entropy over all T+20 positions (the training loss).  A model
    without memory scores ce = 10·ln 8/(T+20), ce10 = ln 8 and acc = 1/8.
    """

    name = "copy"
    main_metric = "acc"
    output_size = N_SYMBOLS

    @dataclass
    class Config:
        T: int = 100  # blanks between the digits and the marker, + 1
        one_hot: bool = False  # feed one-hot symbols (10 inputs) instead of the scalar value
        eval_size: int = 512  # sequences in the evaluation set
        eval_seed: int = 0  # the evaluation set's seed (the same for every run)

    def _check(self) -> None:
        _check_positive("T", self.config.T)
        _check_positive("eval_size", self.config.eval_size)

    @property
    def input_size(self) -> int:
        return N_SYMBOLS if self.config.one_hot else 1

    def sample(self, batch: int, generator: torch.Generator, T: Optional[int] = None) -> Chunk:
        symbols, y = copying_batch(T or self.config.T, batch, generator)  # (T+20, B) each
        return Chunk(encode_copying(symbols, self.config.one_hot), y, True)

    def loss_fn(self, chunk: Chunk, readout: Readout):
        """Cross-entropy summed over the block's positions / ((T+20)·B): additive over blocks, and
        the whole chunk's loss is the mean CE over all positions (the paper's training loss)."""
        y = chunk.y  # (T+20, B)
        L, B = y.shape

        def loss(start: int, stop: int, output: Tensor, summary: Tensor) -> Tensor:
            logits = readout(output, summary)  # (w, B, 10)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   y[start:stop].reshape(-1), reduction="sum") / (L * B)
        return loss

    @staticmethod
    def metrics_from_logits(logits: Tensor, y: Tensor) -> Dict[str, float]:
        """acc, ce10, ce of logits (T+20, B, 10) against targets (T+20, B)."""
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                             reduction="none").view_as(y)  # (T+20, B)
        tail = slice(-N_DIGITS, None)
        acc = (logits[tail].argmax(-1) == y[tail]).float().mean()
        return {"acc": acc.item(), "ce10": ce[tail].mean().item(), "ce": ce.mean().item()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, T: Optional[int] = None, batch_size: int = 128,
                 chunk_len: int = 1000) -> Dict[str, float]:
        """The paper's metrics on the fixed evaluation set, at the trained T or another one
        (transfer, SPEC §6); long sequences run in windows with the state carried."""
        T = T or self.config.T
        generator = self.eval_generator()
        sums = {"correct": 0.0, "ce10": 0.0, "ce": 0.0}
        n = 0
        for b0 in range(0, self.config.eval_size, batch_size):
            b = min(batch_size, self.config.eval_size - b0)
            x, y, _ = self.sample(b, generator, T)  # (T+20, b, I), (T+20, b)
            x, y = x.to(_device_of(model)), y.to(_device_of(model))
            for start, stop, output, summary in _run_chunks(model, x, chunk_len):
                logits = model.readout(output, summary)  # (w, b, 10)
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     y[start:stop].reshape(-1), reduction="none")
                ce = ce.view(stop - start, b)  # (w, b)
                sums["ce"] += ce.sum().item()
                tail0 = max(start, y.shape[0] - N_DIGITS)  # the recalled digits in this window
                if tail0 < stop:
                    i = tail0 - start
                    sums["ce10"] += ce[i:].sum().item()
                    sums["correct"] += (logits[i:].argmax(-1) == y[tail0:stop]).sum().item()
            n += b
        return {"acc": sums["correct"] / (n * N_DIGITS), "ce10": sums["ce10"] / (n * N_DIGITS),
                "ce": sums["ce"] / (n * (T + 2 * N_DIGITS))}

    @staticmethod
    def no_memory_ce(T: int) -> float:
        """CE over all positions of the best model without memory: blanks are certain, each
        recalled digit is a uniform guess among 8 (SPEC §6)."""
        return N_DIGITS * math.log(8) / (T + 2 * N_DIGITS)


# -- adding ------------------------------------------------------------------------------------

class AddingTask(Task):
    """The adding problem (SPEC §6): predict the sum (or mean) of the two marked values from the
    last step; MSE.  Always predicting 1.0 scores 1/6 (sum); 0.5 scores 1/24 (mean)."""

    name = "adding"
    main_metric = "mse"
    input_size = 2
    output_size = 1

    @dataclass
    class Config:
        T: int = 200
        target: str = "sum"  # "sum" (SPEC §6) or "mean" (the authors' variant)
        eval_size: int = 512
        eval_seed: int = 0

    def _check(self) -> None:
        _check_positive("T", self.config.T, 2)
        _check_positive("eval_size", self.config.eval_size)
        if self.config.target not in ("sum", "mean"):
            raise ValueError(f"adding target must be 'sum' or 'mean', got {self.config.target!r}")

    def sample(self, batch: int, generator: torch.Generator, T: Optional[int] = None) -> Chunk:
        x, y = adding_batch(T or self.config.T, batch, generator, self.config.target)
        return Chunk(x, y, True)

    def loss_fn(self, chunk: Chunk, readout: Readout):
        """MSE of the prediction at the last step; ``None`` for blocks without the last step."""
        T, y = chunk.x.shape[0], chunk.y  # y: (B,)

        def loss(start: int, stop: int, output: Tensor, summary: Tensor) -> Optional[Tensor]:
            if stop < T:
                return None
            pred = readout(output[-1:], summary[-1:])[0, :, 0]  # (B,)
            return F.mse_loss(pred, y)
        loss.loss_steps = (T - 1,)  # the sparse engine recomputes only blocks that need it
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, T: Optional[int] = None, batch_size: int = 128,
                 chunk_len: int = 1000) -> Dict[str, float]:
        T = T or self.config.T
        generator = self.eval_generator()
        sq, n = 0.0, 0
        for b0 in range(0, self.config.eval_size, batch_size):
            b = min(batch_size, self.config.eval_size - b0)
            x, y, _ = self.sample(b, generator, T)  # (T, b, 2), (b,)
            x, y = x.to(_device_of(model)), y.to(_device_of(model))
            for start, stop, output, summary in _run_chunks(model, x, chunk_len):
                if stop == T:
                    pred = model.readout(output[-1:], summary[-1:])[0, :, 0]  # (b,)
                    sq += ((pred - y) ** 2).sum().item()
            n += b
        return {"mse": sq / n}


TASKS = {CopyingTask.name: CopyingTask, AddingTask.name: AddingTask}


def build_task(name: str, **fields_) -> Task:
    """``build_task("copy", T=100, one_hot=True)``; unknown fields are an error naming them."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {name!r}")
    cls = TASKS[name]
    allowed = {f.name for f in fields(cls.Config)}
    unknown = sorted(set(fields_) - allowed)
    if unknown:
        raise ValueError(f"task {name!r} has no option {', '.join(unknown)}; it has "
                         f"{', '.join(sorted(allowed))}")
    return cls(cls.Config(**fields_))
