"""The state a recurrent layer takes and returns, so a long stream can be fed chunk by chunk.

``RecurrentState(h, c, memory, step)``: ``h`` and ``c`` are ``(num_layers, B, H)`` as in nn.LSTM
(``(num_layers, H)`` for unbatched input), ``memory`` holds one :class:`~sab.memory.MemoryBank` per
layer (``None`` for models without memory), and ``step`` is the global step counter that keeps the
phase of the truncation blocks (``t % k_trunc``) and of the memory writes (``(t+1) % k_att``).

Between optimizer steps call :meth:`RecurrentState.detach` (SPEC §3): the values are kept, the
autograd history is cut — the ``repackage_hidden`` of the PyTorch examples.  Within one optimizer
step, pass the state on undetached: credit then flows back across chunks, and running a sequence in
two chunks gives the same outputs and gradients as running it whole.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from torch import Tensor

from .memory import MemoryBank

__all__ = ["RecurrentState", "AttentionRecord"]


@dataclass
class RecurrentState:
    h: Tensor  # (L, B, H)
    c: Tensor  # (L, B, H)
    memory: Optional[List[Optional[MemoryBank]]] = None  # one bank per layer
    step: int = 0

    def detach(self) -> "RecurrentState":
        """Same values, no autograd history (for the next optimizer step)."""
        memory = None if self.memory is None else [
            None if bank is None else bank.detach() for bank in self.memory]
        return RecurrentState(self.h.detach(), self.c.detach(), memory, self.step)

    def to(self, *args, **kwargs) -> "RecurrentState":
        memory = None if self.memory is None else [
            None if bank is None else bank.to(*args, **kwargs) for bank in self.memory]
        return RecurrentState(self.h.to(*args, **kwargs), self.c.to(*args, **kwargs), memory,
                              self.step)

    def __iter__(self):  # ``h, c = state`` as with nn.LSTM's tuple
        return iter((self.h, self.c))


@dataclass
class AttentionRecord:
    """What one layer's attention did at every step of one call (``return_attention=True``).

    Time-major ``(T, B, ...)``, or ``(B, T, ...)`` for a ``batch_first`` layer.  Entries past the
    number of memories read at a step are padding: weight 0, index -1, step -1.
    """

    summary: Tensor  # (T, B, H)  s(t)
    weights: Tensor  # (T, B, K)  attention weights of the read memories
    indices: Tensor  # (T, B, K)  global memory ids (count of writes since the stream began)
    memory_steps: Tensor  # (T, B, K)  global step at which each read memory was written
    steps: Tensor = field(default=None)  # (T,) global step of each row
