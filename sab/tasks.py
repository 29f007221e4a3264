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
sequences) or kept (the next window of the same streams, as in language modelling: the trainer
then carries ``result.state``, detached, into the next chunk).  A task whose ``input_vocab`` is set
yields token ids ``x`` (T, B); the model embeds them (``SequenceModel.encode``).

Copying (paper format), time-major, length T+20::

    input : d1 … d10  0 … 0 (T−1 blanks)  9  0 … 0 (10 blanks)      digits d_i uniform in {1..8}
    target: 0 … 0 (T+10 blanks)              d1 … d10

Data-backed tasks read local files through ``sab.data`` (SPEC §10): ``ptb`` and ``text8``
(character-level language modelling: token-id windows, the state carried between them, bits per
character) and ``mnist``, ``pmnist``, ``fmnist``, ``pfmnist``, ``cifar10`` (sequential
classification from the last step, accuracy).

Adding: two inputs per step, a value ~ U[0, 1] and a marker (1 at one step in each half, 0
elsewhere); the target, read at the last step, is the sum of the two marked values (or their mean,
the authors' variant).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, fields
from typing import Callable, Dict, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Chunk", "CopyingTask", "AddingTask", "CharLMTask", "Text8Task",
           "SequentialImageTask", "TASKS", "build_task", "copying_batch", "adding_batch",
           "derive_seed", "encode_copying", "SyntheticStream", "WindowStream", "ImageStream"]

N_DIGITS = 10  # digits to copy (SPEC §6)
# Sequences per draw of a synthetic task's evaluation set (``Task.eval_batches``): the set is drawn
# in blocks of this size whatever the evaluation batch, so every batch size scores the same
# sequences.  128 is the trainer's ``eval_batch`` default, the size every recorded run drew with.
EVAL_BLOCK = 128
N_SYMBOLS = 10  # 0 blank, 1..8 digits, 9 marker
BLANK, MARKER = 0, 9

Readout = Callable[[Tensor, Tensor], Tensor]  # (output, summary) (T, B, H) -> (T, B, out)


class Chunk(NamedTuple):
    x: Tensor  # (T, B, input_size), or token ids (T, B) for tasks with an ``input_vocab``
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


def _batch_slice(chunk: Chunk, sl: slice) -> Chunk:
    """Sequences ``sl`` of a synthetic chunk: x (L, B, …), y (L, B) or (B,)."""
    return Chunk(chunk.x[:, sl], chunk.y[sl] if chunk.y.dim() == 1 else chunk.y[:, sl],
                 chunk.reset)


def _batch_cat(chunks: list) -> Chunk:
    """Chunks joined along the batch (the inverse of ``_batch_slice``)."""
    if len(chunks) == 1:
        return chunks[0]
    y_dim = 0 if chunks[0].y.dim() == 1 else 1
    return Chunk(torch.cat([c.x for c in chunks], 1), torch.cat([c.y for c in chunks], y_dim),
                 chunks[0].reset)


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
        return _batch_slice(Chunk(x, y, reset), slice(self.rank * local, (self.rank + 1) * local))

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
    input_vocab: Optional[int] = None  # inputs are token ids (T, B) of this many symbols
    dry_run: Dict[str, object] = {}  # task options of ``sab train --dry-run``
    carries_state = False  # the stream has chunks with reset=False (the trainer keeps the state)
    draws_eval_set = False  # the evaluation set is drawn from eval_generator (eval_batches)

    def __init__(self, config=None):
        self.config = config if config is not None else self.Config()
        self.validate(self.config)
        self._check()

    @classmethod
    def validate(cls, config) -> None:
        """Check the options without touching data (ValueError naming the option)."""

    def _check(self) -> None:
        pass

    def sample(self, batch: int, generator: torch.Generator, T: Optional[int] = None) -> Chunk:
        raise NotImplementedError

    def carry(self, state):
        """The part of the state that goes into the next chunk (``reset=False`` tasks)."""
        return state

    def train_stream(self, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1) -> SyntheticStream:
        return SyntheticStream(lambda b, g: self.sample(b, g), batch_size, seed, rank, world_size)

    def eval_generator(self) -> torch.Generator:
        """The evaluation set's generator: a fixed seed, the same for every run and model."""
        return torch.Generator().manual_seed(derive_seed(self.config.eval_seed, "eval-data"))

    def eval_batches(self, batch_size: int, T: Optional[int] = None,
                     size: Optional[int] = None) -> Iterator[Chunk]:
        """The fixed evaluation set of a synthetic task, in batches of ``batch_size`` sequences.

        The ``size`` (default ``eval_size``) sequences are drawn from ``eval_generator`` in blocks
        of ``EVAL_BLOCK`` (the last one shorter) and re-cut into batches, so the sequences and
        their order do not depend on ``batch_size``: ``sab eval`` at any ``--eval-batch`` scores
        the very sequences the trainer's evaluations scored.  Another ``size`` is another set
        (a block of another length is another draw), whatever the batch."""
        _check_positive("batch_size", batch_size)
        size = self.config.eval_size if size is None else size
        _check_positive("size", size)
        generator = self.eval_generator()
        pending, have, drawn = [], 0, 0  # blocks drawn and not yet handed out
        while have or drawn < size:
            while have < batch_size and drawn < size:
                k = min(EVAL_BLOCK, size - drawn)
                pending.append(self.sample(k, generator, T))
                have, drawn = have + k, drawn + k
            chunk, b = _batch_cat(pending), min(batch_size, have)
            yield _batch_slice(chunk, slice(0, b))
            pending, have = ([_batch_slice(chunk, slice(b, None))] if have > b else []), have - b

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
    draws_eval_set = True
    main_metric = "acc"
    output_size = N_SYMBOLS
    dry_run = {"T": 10, "eval_size": 4}

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
                 chunk_len: int = 1000, per_position: bool = False) -> Dict[str, float]:
        """The paper's metrics on the fixed evaluation set, at the trained T or another one
        (transfer, SPEC §6); long sequences run in windows with the state carried.

        ``per_position``: also ``acc_by_position`` and ``ce10_by_position``, lists of the
        accuracy and cross-entropy at each of the 10 recalled digits (first to last), whose
        means are ``acc`` and ``ce10``: they show which digits a model has learned to recall."""
        T = T or self.config.T
        ce_sum = 0.0
        pos_correct = torch.zeros(N_DIGITS, dtype=torch.float64)  # (10,) summed over sequences
        pos_ce = torch.zeros(N_DIGITS, dtype=torch.float64)  # (10,)
        n = 0
        for x, y, _ in self.eval_batches(batch_size, T):  # (T+20, b, I), (T+20, b)
            b = x.shape[1]
            x, y = x.to(_device_of(model)), y.to(_device_of(model))
            for start, stop, output, summary in _run_chunks(model, x, chunk_len):
                logits = model.readout(output, summary)  # (w, b, 10)
                ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                     y[start:stop].reshape(-1), reduction="none")
                ce = ce.view(stop - start, b)  # (w, b)
                ce_sum += ce.sum().item()
                tail0 = max(start, y.shape[0] - N_DIGITS)  # the recalled digits in this window
                if tail0 < stop:
                    i = tail0 - start
                    hit = (logits[i:].argmax(-1) == y[tail0:stop])  # (stop - tail0, b)
                    d = tail0 - (y.shape[0] - N_DIGITS)  # index of the first digit here
                    pos_correct[d:d + stop - tail0] += hit.sum(1).double().cpu()
                    pos_ce[d:d + stop - tail0] += ce[i:].double().sum(1).cpu()
            n += b
        out = {"acc": pos_correct.sum().item() / (n * N_DIGITS),
               "ce10": pos_ce.sum().item() / (n * N_DIGITS),
               "ce": ce_sum / (n * (T + 2 * N_DIGITS))}
        if per_position:
            out["acc_by_position"] = (pos_correct / n).tolist()
            out["ce10_by_position"] = (pos_ce / n).tolist()
        return out

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
    draws_eval_set = True
    main_metric = "mse"
    input_size = 2
    output_size = 1
    dry_run = {"T": 10, "eval_size": 4}

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
        sq, n = 0.0, 0
        for x, y, _ in self.eval_batches(batch_size, T):  # (T, b, 2), (b,)
            b = x.shape[1]
            x, y = x.to(_device_of(model)), y.to(_device_of(model))
            for start, stop, output, summary in _run_chunks(model, x, chunk_len):
                if stop == T:
                    pred = model.readout(output[-1:], summary[-1:])[0, :, 0]  # (b,)
                    sq += ((pred - y) ** 2).sum().item()
            n += b
        return {"mse": sq / n}


# -- data-backed tasks (SPEC §6, §10) ----------------------------------------------------------
#
# They read local files through ``sab.data`` (verified; a missing or bad file raises the data
# layer's DataError, which says what to put where).  ``data_dir`` is the data root (None:
# ``$SAB_DATA``, else ``~/.cache/sab``); it may change when a run is resumed.

def _progress(iterable, total: int, desc: str):
    """tqdm for long evaluations, quiet when stderr is not a terminal."""
    import sys
    from tqdm import tqdm
    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True,
                disable=not sys.stderr.isatty())


def _check_split(value) -> None:
    if value not in ("valid", "test"):
        raise ValueError(f"eval_split must be 'valid' or 'test', got {value!r}")


def _check_dataset(name: str, kinds: tuple, task: str) -> None:
    from .data import REGISTRY
    if name not in REGISTRY or REGISTRY[name].kind not in kinds:
        known = sorted(n for n, s in REGISTRY.items() if s.kind in kinds)
        raise ValueError(f"task {task!r} reads one of the datasets {', '.join(known)}; "
                         f"got dataset {name!r}")


class WindowStream:
    """Training windows of a character stream, in order, the state carried between them (SPEC §6:
    "contiguous text, state carried across chunks").

    The training split is cut into ``batch_size`` contiguous columns (``sab.data.batchify``) and
    read down the columns ``seq_len`` rows at a time (``sab.data.iter_windows``)::

        columns (N, B)      window 0        window 1        …   last window (may be shorter)
        ┌ a g m s ┐         x rows 0..L-1   x rows L..2L-1
        │ b h n t │         y rows 1..L     y rows L+1..2L      then row 0 again: a new epoch,
        │ …       │         reset=True      reset=False         reset=True (the state dropped)

    Every chunk but an epoch's first has ``reset=False``: the trainer carries the model's state
    (h, c and the SAB memory, detached) into it.  ``state_dict`` is the position (row, epoch).

    Data-parallel: the columns are cut for the global batch and each rank keeps its slice of them,
    so the ranks' windows side by side are the single-process window.
    """

    def __init__(self, data: Tensor, batch_size: int, seq_len: int, rank: int = 0,
                 world_size: int = 1):
        from .data import batchify
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of "
                             f"processes {world_size}")
        batched = batchify(data, batch_size)  # (N, B)
        if batched.shape[0] < 2:
            raise ValueError(f"the training split ({data.numel()} characters) is too short for "
                             f"{batch_size} columns")
        local = batch_size // world_size
        self.columns = batched[:, rank * local:(rank + 1) * local]  # (N, B / world)
        self.seq_len = seq_len
        self.row, self.epoch = 0, 0

    def __iter__(self) -> "WindowStream":
        return self

    def __next__(self) -> Chunk:
        from .data import iter_windows
        if self.row >= self.columns.shape[0] - 1:  # the split is used up: start again
            self.row, self.epoch = 0, self.epoch + 1
        x, y = next(iter_windows(self.columns, self.seq_len, self.row))  # (L, b) each
        reset = self.row == 0
        self.row += x.shape[0]
        return Chunk(x, y, reset)

    def state_dict(self) -> dict:
        return {"row": self.row, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.row, self.epoch = int(state["row"]), int(state["epoch"])


class CharLMTask(Task):
    """Character-level language modelling (SPEC §6): Penn Treebank characters or text8.

    Input: token ids (T, B) — the model embeds them (``SequenceModel.embedding``); target: the next
    character at every step; loss: mean cross-entropy over the window's T·B predictions (nats).
    Metric: bits per character on the evaluation split, read once in ``eval_columns`` contiguous
    columns with the state carried from window to window (as in training, without gradients).
    The vocabulary is the training split's (``sab.data.CharVocab``).

    SAB's memory grows by one slot every ``k_att`` steps for as long as the state is carried; set
    the model's ``max_memories`` to bound it (the oldest memory is evicted).  ``max_memories``
    bounds the count, not the norms: h(t) = ĥ(t) + s(t) is written to memory and s(t) is a convex
    combination of memories (SPEC §2), so along an unbroken stream the memories' norms can grow
    step after step — measured on PTB, see the README.  ``reset_memory`` empties the memory at
    every window (h and c are still carried), which bounds that growth to one window.
    """

    name = "ptb"
    main_metric = "bpc"
    carries_state = True
    dry_run = {"seq_len": 10, "eval_size": 200}

    @dataclass
    class Config:
        dataset: str = "ptb_char"  # ptb_char or text8 (sab.data.REGISTRY)
        data_dir: Optional[str] = None  # data root (None: $SAB_DATA, else ~/.cache/sab)
        seq_len: int = 150  # characters per training window (one optimizer step)
        eval_split: str = "valid"  # valid or test
        eval_size: Optional[int] = None  # score only the first N characters (None: all)
        eval_columns: int = 10  # contiguous columns the evaluation split is read in
        reset_memory: bool = False  # empty SAB's memory at every window (h, c still carried)

    @classmethod
    def validate(cls, config) -> None:
        _check_dataset(config.dataset, ("ptb_char", "text8"), cls.name)
        _check_positive("seq_len", config.seq_len)
        _check_positive("eval_columns", config.eval_columns)
        if config.eval_size is not None:
            _check_positive("eval_size", config.eval_size, 2)
        _check_split(config.eval_split)

    def _check(self) -> None:
        from .data import load_char_corpus
        # text8's 100M characters are held as uint8; windows come out as int64
        self.corpus = load_char_corpus(self.config.dataset, self.config.data_dir,
                                       dtype=torch.uint8 if self.config.dataset == "text8"
                                       else torch.long)
        self.vocab = self.corpus.vocab
        self.input_vocab = self.output_size = len(self.vocab)
        self.input_size = len(self.vocab)  # before the embedding

    def carry(self, state):
        """The state the next window starts from: all of it, or h and c only (reset_memory)."""
        if state is None or not self.config.reset_memory:
            return state
        return type(state)(state.h, state.c, None, state.step)

    def train_stream(self, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1) -> WindowStream:
        """The windows in order; ``seed`` does not enter (the text is read as it is)."""
        return WindowStream(self.corpus.train, batch_size, self.config.seq_len, rank, world_size)

    def eval_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(0)  # unused: the evaluation text is fixed

    def _eval_columns(self) -> Tensor:
        from .data import batchify
        data = self.corpus.split(self.config.eval_split)
        if self.config.eval_size is not None:
            data = data[:self.config.eval_size + 1]  # N characters scored: N + 1 read
        columns = min(self.config.eval_columns, data.numel() // 2)
        if columns < 1:
            raise ValueError(f"the {self.config.eval_split} split is too short to evaluate")
        return batchify(data, columns)  # (N, columns)

    def sample(self, batch: int, generator: torch.Generator, T: Optional[int] = None) -> Chunk:
        """The first window of the evaluation columns (for plots): x, y (L, b) token ids."""
        from .data import iter_windows
        columns = self._eval_columns()[:, :batch]  # (N, b)
        x, y = next(iter_windows(columns, T or self.config.seq_len))  # (L, b) each
        return Chunk(x, y, True)

    def loss_fn(self, chunk: Chunk, readout: Readout):
        """Cross-entropy summed over the block / (L·B): additive over blocks, the chunk's loss
        is the mean CE per character (nats; ``/ ln 2`` for bits)."""
        y = chunk.y  # (L, B)
        L, B = y.shape

        def loss(start: int, stop: int, output: Tensor, summary: Tensor) -> Tensor:
            logits = readout(output, summary)  # (w, B, V)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                   y[start:stop].reshape(-1), reduction="sum") / (L * B)
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, T: Optional[int] = None, batch_size: int = 128,
                 chunk_len: int = 1000,
                 on_window: Optional[Callable[[float, Tensor, object], None]] = None
                 ) -> Dict[str, float]:
        """Bits per character (and CE in nats) of the evaluation split, read in windows of
        ``chunk_len`` characters with the state carried: the result does not depend on
        ``chunk_len`` (nor on ``batch_size``: the columns are ``eval_columns``) — except with
        ``reset_memory``, where the windows are ``seq_len`` long, as in training.
        ``on_window(nll, y, state)`` is called after each window with its summed cross-entropy
        (nats), its targets ``y`` (w, C) and the state after it (``benchmarks.eval_windows``)."""
        from .data import bits_per_char, iter_windows
        columns = self._eval_columns()  # (N, C)
        if self.config.reset_memory:
            chunk_len = self.config.seq_len
        n_windows = -(-(columns.shape[0] - 1) // chunk_len)
        device = next(model.parameters()).device
        state, nll, n = None, 0.0, 0
        for x, y in _progress(iter_windows(columns, chunk_len), n_windows, "eval bpc"):
            x, y = x.to(device), y.to(device)  # (w, C) each
            output, state, records = model(x, self.carry(state), return_attention=True)
            logits = model.readout(output, records[-1].summary)  # (w, C, V)
            window_nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                         reduction="sum").item()
            nll, n = nll + window_nll, n + y.numel()
            if on_window is not None:
                on_window(window_nll, y, state)
        return {"bpc": bits_per_char(nll, n), "ce": nll / n}


class Text8Task(CharLMTask):
    """Character-level text8 (SPEC §6): 90M / 5M / 5M characters."""

    name = "text8"

    @dataclass
    class Config(CharLMTask.Config):
        dataset: str = "text8"


class ImageStream:
    """Endless shuffled training batches of a ``SequentialImages`` (``sab.data.BatchIterator``,
    epoch after epoch, whole batches only); ``state_dict`` is the exact data position.

    Data-parallel like ``SyntheticStream``: every rank draws the global batch, keeps its slice.
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        from .data import BatchIterator
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of "
                             f"processes {world_size}")
        if len(dataset) < batch_size:
            raise ValueError(f"the training split has {len(dataset)} images, fewer than the "
                             f"batch size {batch_size}")
        generator = torch.Generator().manual_seed(derive_seed(seed, "train-data"))
        self.batches = BatchIterator(dataset, batch_size, generator, shuffle=True,
                                     drop_last=True)
        self.rank, self.world_size = rank, world_size
        self._it = None

    def __iter__(self) -> "ImageStream":
        return self

    def __next__(self) -> Chunk:
        while True:
            if self._it is None:
                self._it = iter(self.batches)
            try:
                x, y = next(self._it)  # (T, B, C), (B,)
                break
            except StopIteration:  # the epoch is over: the iterator has moved to the next one
                self._it = None
        if self.world_size > 1:
            local = x.shape[1] // self.world_size
            sl = slice(self.rank * local, (self.rank + 1) * local)
            x, y = x[:, sl], y[sl]  # (T, B / world, C), (B / world,)
        return Chunk(x, y, True)

    def state_dict(self) -> dict:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state)
        self._it = None


class SequentialImageTask(Task):
    """Sequential classification (SPEC §6): an image read one pixel per step (MNIST-like: 784
    steps × 1 value; CIFAR-10: 1024 steps × 3 channels), normalised with the training portion's
    per-channel statistics; optionally a fixed permutation of the steps from ``perm_seed``
    (``sab.data.pixel_permutation``).  The class is read from the last step, ``[h(T); s(T)]``;
    loss: cross-entropy; metrics: accuracy and CE on the validation split — the last
    ``valid_size`` training images, held out (``sab.data.load_sequential``) — or the test split.
    """

    name = "mnist"
    main_metric = "acc"
    dry_run = {"eval_size": 4}

    @dataclass
    class Config:
        dataset: str = "mnist"  # mnist, mnist5k, fashion_mnist, cifar10 (sab.data.REGISTRY)
        data_dir: Optional[str] = None  # data root (None: $SAB_DATA, else ~/.cache/sab)
        permuted: bool = False  # permute the pixel order (the same fixed permutation everywhere)
        perm_seed: int = 1234  # seed of that permutation
        valid_size: Optional[int] = None  # held-out training images (None: 5000; mnist5k 400)
        eval_split: str = "valid"  # valid or test
        eval_size: Optional[int] = None  # evaluate on the first N images (None: all)

    @classmethod
    def validate(cls, config) -> None:
        _check_dataset(config.dataset, ("idx", "cifar10"), cls.name)
        if config.valid_size is not None:
            _check_positive("valid_size", config.valid_size)
        if config.eval_size is not None:
            _check_positive("eval_size", config.eval_size)
        _check_split(config.eval_split)

    def _check(self) -> None:
        from .data import load_sequential
        c = self.config
        self.splits = load_sequential(c.dataset, c.data_dir, permuted=c.permuted,
                                      seed=c.perm_seed, valid_size=c.valid_size)
        train = self.splits["train"]
        self.input_size, self.output_size = train.C, train.num_classes
        self.T = train.T

    def train_stream(self, batch_size: int, seed: int, rank: int = 0,
                     world_size: int = 1) -> ImageStream:
        return ImageStream(self.splits["train"], batch_size, seed, rank, world_size)

    def eval_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(0)  # unused: the evaluation images are fixed

    def _eval_set(self):
        data = self.splits[self.config.eval_split]
        n = len(data) if self.config.eval_size is None else min(len(data), self.config.eval_size)
        return data, n

    def sample(self, batch: int, generator: torch.Generator, T: Optional[int] = None) -> Chunk:
        """The first ``batch`` evaluation images (for plots): x (T, b, C), y (b,)."""
        data, n = self._eval_set()
        x, y = data.get(torch.arange(min(batch, n)))
        return Chunk(x, y, True)

    def loss_fn(self, chunk: Chunk, readout: Readout):
        """Mean CE of the class read at the last step; ``None`` for blocks without it."""
        T, y = chunk.x.shape[0], chunk.y  # y: (B,)

        def loss(start: int, stop: int, output: Tensor, summary: Tensor) -> Optional[Tensor]:
            if stop < T:
                return None
            logits = readout(output[-1:], summary[-1:])[0]  # (B, classes)
            return F.cross_entropy(logits, y)
        loss.loss_steps = (T - 1,)  # the sparse engine recomputes only blocks that need it
        return loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, T: Optional[int] = None, batch_size: int = 128,
                 chunk_len: int = 1000) -> Dict[str, float]:
        """Accuracy and mean CE of the class read at the last step, over the evaluation set."""
        data, n = self._eval_set()
        device = next(model.parameters()).device
        correct, ce = 0, 0.0
        starts = range(0, n, batch_size)
        for b0 in _progress(starts, len(starts), "eval acc"):
            x, y = data.get(torch.arange(b0, min(n, b0 + batch_size)))  # (T, b, C), (b,)
            x, y = x.to(device), y.to(device)
            for start, stop, output, summary in _run_chunks(model, x, chunk_len):
                if stop == x.shape[0]:
                    logits = model.readout(output[-1:], summary[-1:])[0]  # (b, classes)
                    ce += F.cross_entropy(logits, y, reduction="sum").item()
                    correct += (logits.argmax(-1) == y).sum().item()
        return {"acc": correct / n, "ce": ce / n}


class MNISTTask(SequentialImageTask):
    """Pixel-by-pixel MNIST (784 steps); ``dataset="mnist5k"`` reads the 5,000-digit subset."""

    name = "mnist"


class PMNISTTask(SequentialImageTask):
    """Permuted pixel-by-pixel MNIST: one fixed permutation from ``perm_seed``."""

    name = "pmnist"

    @dataclass
    class Config(SequentialImageTask.Config):
        permuted: bool = True


class FMNISTTask(SequentialImageTask):
    """Pixel-by-pixel Fashion-MNIST (the same format as MNIST, SPEC §10)."""

    name = "fmnist"

    @dataclass
    class Config(SequentialImageTask.Config):
        dataset: str = "fashion_mnist"


class PFMNISTTask(SequentialImageTask):
    """Permuted pixel-by-pixel Fashion-MNIST."""

    name = "pfmnist"

    @dataclass
    class Config(SequentialImageTask.Config):
        dataset: str = "fashion_mnist"
        permuted: bool = True


class CIFAR10Task(SequentialImageTask):
    """Sequential CIFAR-10: 1024 steps of 3 values (the channels of one pixel)."""

    name = "cifar10"

    @dataclass
    class Config(SequentialImageTask.Config):
        dataset: str = "cifar10"


TASKS = {t.name: t for t in (CopyingTask, AddingTask, CharLMTask, Text8Task, MNISTTask,
                                 PMNISTTask, FMNISTTask, PFMNISTTask, CIFAR10Task)}


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
