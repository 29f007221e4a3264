"""Elementwise maths the hot loops use, written for PyTorch's CPU kernels.

PyTorch's CPU ``tanh`` is about ten times slower than its ``sigmoid`` (float32, one thread, AMD
EPYC with AVX-512: 49 µs against 5 µs on a (64, 128) tensor), and an LSTM step and the MLP
scorer's backward call it on every step.  ``tanh(x) = 2·σ(2x) − 1`` is the same function; in
float64 the two agree to ~1e-16, in float32 to a few units of 1e-8 (absolute).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["tanh"]


def tanh(x: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``tanh(x)`` as ``2·σ(2x) − 1``, without a graph (callers use it inside hand-written
    forward and backward passes).  ``out`` may be ``x`` itself (in place)."""
    y = torch.mul(x, 2) if out is None else torch.mul(x, 2, out=out)
    return y.sigmoid_().mul_(2).sub_(1)
