"""The memory bank of SPEC §2.2–2.3, with a backward pass that touches only what attention read.

A bank holds the memories ``m_i = h(t_i)`` of one layer, ``(B, n, H)``, and their cached keys
``W_k m_i``, ``(B, n, d_k)``, in preallocated buffers (grown by doubling, so a write is O(1), never
an O(n) concatenation).  The buffers hold *values* only; the autograd graph is routed through two
small custom functions, so that attention over ``n`` memories costs ``O(B·k_top·H)`` per step in
the backward pass instead of a dense ``(B, n, H)`` gradient per step (SPEC §9a):

* ``_Write`` at the step a memory is written: takes ``h(t_i)`` and its key (with their graphs) and
  returns a *token*, a scalar that chains every write of the bank: ``token_i = Write(h, key,
  token_{i-1})``.
* ``_Gather`` at a step that reads memories: takes the current token and returns the selected
  memories and keys.  Its backward adds the incoming gradient into per-memory accumulators
  (``index_add_`` on the selected rows only) and passes a zero to the token.

Why the token chain: autograd runs a node only after every node that consumes its output.  Every
gather that could read memory ``i`` consumes ``token_j`` for some ``j ≥ i``, and ``token_j``
depends on ``token_i``, so ``Write_i``'s backward runs after all of them, when the accumulator of
memory ``i`` is complete; it then hands that gradient to ``h(t_i)`` and its key, and autograd
continues through ``t_i``'s block as usual (multi-hop credit, SPEC §3).  A memory that no one
selected returns no gradient at all.

Eviction (``max_memories``): when the bank is full, a new memory overwrites the oldest one (a ring).
Memory *ids* count writes from the start of the stream and never repeat; slots are reused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import Function

__all__ = ["MemoryBank"]


class _Graph:
    """Gradient accumulators shared by the writes and gathers of one autograd graph of one bank.

    Memories get graph-local rows ``id - first_id``; memories carried in detached (ids below
    ``first_id``) are not in the graph and their gradient is dropped, like a detached state.
    """

    def __init__(self, first_id: int):
        self.first_id = first_id
        self.n_ids = 0  # writes in this graph so far
        self.grad_v: Optional[Tensor] = None  # (B, n_ids, H)
        self.grad_k: Optional[Tensor] = None  # (B, n_ids, d_k)

    def _ensure(self, like_v: Tensor, like_k: Tensor) -> None:
        B, H, dk = like_v.shape[0], like_v.shape[-1], like_k.shape[-1]
        have = 0 if self.grad_v is None else self.grad_v.shape[1]
        if have < self.n_ids:
            grad_v = like_v.new_zeros(B, self.n_ids, H)
            grad_k = like_k.new_zeros(B, self.n_ids, dk)
            if have:
                grad_v[:, :have] = self.grad_v
                grad_k[:, :have] = self.grad_k
            self.grad_v, self.grad_k = grad_v, grad_k

    def accumulate(self, ids: Tensor, gv: Tensor, gk: Tensor) -> None:
        """Add ``gv`` (B, m, H) and ``gk`` (B, m, d_k) into the rows of memories ``ids`` (B, m)."""
        self._ensure(gv, gk)
        B, m = ids.shape
        rel = ids - self.first_id  # (B, m)
        keep = rel >= 0  # older memories came in detached
        if not bool(keep.all()):
            gv = gv * keep.unsqueeze(-1)
            gk = gk * keep.unsqueeze(-1)
            rel = rel.clamp_min(0)
        n = self.grad_v.shape[1]
        flat = (rel + torch.arange(B, device=ids.device).unsqueeze(1) * n).reshape(-1)  # (B*m,)
        self.grad_v.view(B * n, -1).index_add_(0, flat, gv.reshape(B * m, -1))
        self.grad_k.view(B * n, -1).index_add_(0, flat, gk.reshape(B * m, -1))

    def take(self, mem_id: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """The accumulated gradient of one memory, (B, H) and (B, d_k); zeroed once taken."""
        row = mem_id - self.first_id
        if self.grad_v is None or row >= self.grad_v.shape[1]:
            return None, None
        gv, gk = self.grad_v[:, row].clone(), self.grad_k[:, row].clone()
        self.grad_v[:, row] = 0
        self.grad_k[:, row] = 0
        return gv, gk


class _Write(Function):
    """Write ``h`` (B, H) and ``key`` (B, d_k) into ``slot``; returns the next token."""

    @staticmethod
    def forward(ctx, h, key, token, bank, slot, mem_id):
        bank.values[:, slot] = h.detach()
        bank.keys[:, slot] = key.detach()
        ctx.graph, ctx.mem_id, ctx.first = bank.graph, mem_id, token is None
        return h.new_zeros(())

    @staticmethod
    def backward(ctx, _grad_token):
        gv, gk = ctx.graph.take(ctx.mem_id)
        return gv, gk, None if ctx.first else _grad_token, None, None, None


class _Gather(Function):
    """Read rows ``slots`` (B, m) of the bank; backward scatters into the selected rows only."""

    @staticmethod
    def forward(ctx, token, values, keys, slots, ids, graph):
        ctx.graph = graph
        ctx.save_for_backward(ids)
        ctx.mark_non_differentiable(ids)
        return _gather_rows(values, slots), _gather_rows(keys, slots)

    @staticmethod
    def backward(ctx, gv, gk):
        (ids,) = ctx.saved_tensors
        ctx.graph.accumulate(ids, gv, gk)
        return torch.zeros((), dtype=gv.dtype, device=gv.device), None, None, None, None, None


def _gather_rows(buf: Tensor, slots: Tensor) -> Tensor:
    """``buf`` (B, cap, D), ``slots`` (B, m) → (B, m, D)."""
    return buf.gather(1, slots.unsqueeze(-1).expand(-1, -1, buf.shape[-1]))


@dataclass
class MemoryBank:
    """The memories of one layer for a batch: values, cached keys and where they came from.

    ``values`` (B, cap, H) and ``keys`` (B, cap, d_k) hold ``count`` valid slots (``[0, count)``);
    ``slot_ids`` (cap,) the global id of each slot and ``slot_steps`` (cap,) the global step at
    which it was written.  ``next_id`` counts every write since the stream began.
    """

    values: Tensor
    keys: Tensor
    slot_ids: Tensor
    slot_steps: Tensor
    count: int = 0
    head: int = 0  # slot of the oldest memory once the ring is full
    next_id: int = 0
    max_memories: Optional[int] = None
    graph: Optional[_Graph] = None
    token: Optional[Tensor] = None

    @classmethod
    def empty(cls, batch: int, hidden: int, key_dim: int, *, max_memories=None, device=None,
              dtype=None, capacity: int = 16) -> "MemoryBank":
        cap = capacity if max_memories is None else max(1, min(capacity, max_memories))
        return cls(
            values=torch.zeros(batch, cap, hidden, device=device, dtype=dtype),
            keys=torch.zeros(batch, cap, key_dim, device=device, dtype=dtype),
            slot_ids=torch.full((cap,), -1, dtype=torch.long, device=device),
            slot_steps=torch.full((cap,), -1, dtype=torch.long, device=device),
            max_memories=max_memories,
        )

    # -- shape --------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.values.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.values.shape[2]

    @property
    def key_size(self) -> int:
        return self.keys.shape[2]

    def __len__(self) -> int:
        return self.count

    # -- state handling -----------------------------------------------------------------------
    def fork(self) -> "MemoryBank":
        """A copy whose writes do not change ``self`` (same graph: credit still flows back)."""
        return MemoryBank(self.values.clone(), self.keys.clone(), self.slot_ids.clone(),
                          self.slot_steps.clone(), self.count, self.head, self.next_id,
                          self.max_memories, self.graph, self.token)

    def detach(self) -> "MemoryBank":
        """The same memories, cut from the graph (like ``repackage_hidden``, SPEC §3)."""
        return MemoryBank(self.values, self.keys, self.slot_ids, self.slot_steps, self.count,
                          self.head, self.next_id, self.max_memories, None, None)

    def to(self, *args, **kwargs) -> "MemoryBank":
        vals = self.values.to(*args, **kwargs)
        return MemoryBank(vals, self.keys.to(*args, **kwargs), self.slot_ids.to(vals.device),
                          self.slot_steps.to(vals.device), self.count, self.head, self.next_id,
                          self.max_memories, self.graph, self.token)

    @property
    def requires_grad(self) -> bool:
        return self.token is not None and self.token.requires_grad

    def ids(self) -> Tensor:
        """Global ids of the valid memories, in slot order: (count,)."""
        return self.slot_ids[: self.count]

    def memories(self) -> Tensor:
        """The valid memories in chronological order, (B, count, H) — a copy, no graph."""
        order = self.slot_ids[: self.count].argsort()
        return self.values[:, : self.count][:, order]

    # -- writing ------------------------------------------------------------------------------
    def _grow(self) -> None:
        """Double the capacity (up to ``max_memories``), oldest memory first in slot 0."""
        cap = self.values.shape[1]
        new_cap = cap * 2 if self.max_memories is None else min(cap * 2, self.max_memories)
        order = (torch.arange(cap, device=self.values.device) + self.head) % cap  # (cap,)

        def grown(buf: Tensor, dim: int, fill) -> Tensor:
            shape = list(buf.shape)
            shape[dim] = new_cap
            out = buf.new_full(shape, fill)
            out.narrow(dim, 0, cap).copy_(buf.index_select(dim, order))
            return out

        self.values, self.keys = grown(self.values, 1, 0), grown(self.keys, 1, 0)
        self.slot_ids, self.slot_steps = grown(self.slot_ids, 0, -1), grown(self.slot_steps, 0, -1)
        self.head = 0

    def write(self, h: Tensor, key: Tensor, step: int) -> None:
        """Append memory ``h`` (B, H) with its key (B, d_k), written at global ``step``."""
        cap = self.values.shape[1]
        full = self.count == cap
        if full and (self.max_memories is None or cap < self.max_memories):
            self._grow()
            cap, full = self.values.shape[1], False
        if full:  # evict the oldest memory: its slot is reused
            slot = self.head
            self.head = (self.head + 1) % cap
        else:
            slot = (self.head + self.count) % cap
            self.count += 1
        mem_id = self.next_id
        self.next_id += 1
        self.slot_ids[slot] = mem_id
        self.slot_steps[slot] = step
        if torch.is_grad_enabled() and (h.requires_grad or key.requires_grad):
            if self.graph is None:
                self.graph = _Graph(first_id=mem_id)
            self.graph.n_ids = mem_id - self.graph.first_id + 1
            self.token = _Write.apply(h, key, self.token, self, slot, mem_id)
        else:
            self.values[:, slot] = h.detach()
            self.keys[:, slot] = key.detach()

    # -- reading ------------------------------------------------------------------------------
    def gather(self, slots: Tensor) -> tuple[Tensor, Tensor]:
        """Memories and keys at ``slots`` (B, m) → (B, m, H), (B, m, d_k), credit-routed."""
        if torch.is_grad_enabled() and self.requires_grad:
            ids = self.slot_ids[slots]  # (B, m)
            return _Gather.apply(self.token, self.values, self.keys, slots, ids, self.graph)
        return _gather_rows(self.values, slots), _gather_rows(self.keys, slots)

    def gather_all(self) -> tuple[Tensor, Tensor]:
        """All valid memories and keys, (B, n, H), (B, n, d_k), in slot order."""
        slots = torch.arange(self.count, device=self.values.device).expand(self.batch_size, -1)
        return self.gather(slots)
