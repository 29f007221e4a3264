"""Engines: one training forward + backward over a chunk, with per-step losses (SPEC §4).

Every engine has the same signature, so the trainer uses any of them for every task::

    result = forward_backward(model, x, loss_fn, state=None, engine="reference")

* ``x`` — the chunk, time-major ``(T, B, I)`` (models must not be ``batch_first`` here).
* ``loss_fn(start, stop, output, summary)`` — the loss of steps ``[start, stop)`` of the chunk,
  given the top layer's ``output`` h(t) and ``summary`` s(t), each ``(stop - start, B, H)``
  (the summary is zeros for models without memory).  It returns a scalar tensor, or ``None`` when
  those steps carry no loss.  The chunk's loss is the *sum* over the calls: normalise inside
  (e.g. divide a cross-entropy sum by ``T·B``).  An engine may call it once for the whole chunk
  (reference) or once per block (sparse), so it must be additive over step ranges.
* The engine calls backward itself: gradients are *accumulated* into ``.grad`` of the parameters.
* Returns an :class:`EngineResult`: the loss value, the state for the next chunk (detached:
  backward has run), the attention records when asked, and counters of the work done.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from torch import Tensor, nn

from .state import AttentionRecord, RecurrentState

__all__ = ["forward_backward", "EngineResult", "ENGINES", "LossFn"]

LossFn = Callable[[int, int, Tensor, Tensor], Optional[Tensor]]


@dataclass
class EngineResult:
    loss: Tensor  # scalar, detached
    state: RecurrentState  # detached, for the next chunk
    attention: Optional[List[AttentionRecord]] = None
    stats: dict = field(default_factory=dict)  # e.g. steps_backpropagated


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def reference(model: nn.Module, x: Tensor, loss_fn: LossFn, state=None,
              return_attention: bool = False) -> EngineResult:
    """Plain autograd over the whole chunk: keeps the graph of every step (SPEC §4)."""
    if getattr(_unwrap(model), "batch_first", False):
        raise ValueError("engines take time-major input: build the model with batch_first=False")
    output, new_state, records = model(x, state, return_attention=True)  # (T, B, H)
    T = output.shape[0]
    loss = loss_fn(0, T, output, records[-1].summary)
    if loss is None:
        raise ValueError("loss_fn returned None for the whole chunk: nothing to train on")
    if loss.requires_grad:
        loss.backward()
    return EngineResult(loss.detach(), new_state.detach(), records if return_attention else None,
                        {"steps": T, "steps_backpropagated": T})


ENGINES = {"reference": reference}


def forward_backward(model: nn.Module, x: Tensor, loss_fn: LossFn, state=None,
                     engine: str = "reference", return_attention: bool = False) -> EngineResult:
    """Forward and backward over one chunk with the chosen engine (see module docs)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {sorted(ENGINES)}, got {engine!r}")
    return ENGINES[engine](model, x, loss_fn, state, return_attention=return_attention)
