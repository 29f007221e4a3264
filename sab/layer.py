"""``SABLSTM``: a drop-in for ``nn.LSTM`` with Sparse Attentive Backtracking (SPEC §2–§3).

Forward, per layer and step t (global step g = state.step + t)::

    if g % k_trunc == 0: cut the recurrent path (h, c)        # block truncation, SPEC §3
    ĥ(t), c(t) = LSTMCell(x(t), (h(t-1), c(t-1)))             # SPEC §2.1
    s(t)       = Σ_i w_i m_i   over the k_top selected memories # SPEC §2.3–2.5
    h(t)       = ĥ(t) + s(t)                                   # SPEC §2.6
    if (g+1) % k_att == 0: memory.append(h(t))                 # SPEC §2.2, memories not detached

This module is the *reference engine* (SPEC §4): plain autograd over that loop.  The memory path
is routed through :mod:`sab.memory`, so the backward cost of attention is O(B·k_top·H) per step,
but the graph of every step is kept until ``backward()``.
"""
from __future__ import annotations

import math
from typing import List, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cell import Selection, attend, lstm_pointwise
from .fused import fused_forward, fused_layer
from .memory import MemoryBank
from .scorer import SCORERS, MLPScorer, make_scorer
from .state import AttentionRecord, RecurrentState

__all__ = ["SABLSTM", "RecurrentLayerBase", "Boundary", "ForwardLog"]


def exists(x) -> bool:
    return x is not None


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = " or None" if allow_none else ""
        raise ValueError(f"{name} must be an integer >= {minimum}{extra}, got {value!r}")


class RecurrentLayerBase(nn.Module):
    """Input/state handling shared by SABLSTM and the baselines (nn.LSTM's calling convention)."""

    input_size: int
    hidden_size: int
    num_layers: int
    batch_first: bool

    def _param_like(self) -> Tensor:
        return next(self.parameters())

    def _prepare_input(self, x: Tensor) -> tuple[Tensor, bool]:
        """Check ``x`` and return it time-major (T, B, I), and whether it was batched."""
        layout = "(B, T, input_size)" if self.batch_first else "(T, B, input_size)"
        expected = f"{layout} or unbatched (T, input_size) with input_size={self.input_size}"
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a tensor {expected}, got {type(x).__name__}")
        if x.dim() not in (2, 3):
            raise ValueError(f"x must have shape {expected}; got {x.dim()} dimensions "
                             f"{tuple(x.shape)}")
        if x.shape[-1] != self.input_size:
            raise ValueError(f"x must have shape {expected}; got feature size {x.shape[-1]} in "
                             f"{tuple(x.shape)}")
        p = self._param_like()
        if not x.is_floating_point() or x.dtype != p.dtype:
            raise TypeError(f"x has dtype {x.dtype} but the layer's parameters are {p.dtype}; "
                            f"convert the input (x.to({p.dtype})) or the layer (layer.to(dtype))")
        if x.device != p.device:
            raise ValueError(f"x is on {x.device} but the layer is on {p.device}")
        batched = x.dim() == 3
        if not batched:
            x = x.unsqueeze(1)  # (T, 1, I)
        elif self.batch_first:
            x = x.transpose(0, 1)  # (B, T, I) -> (T, B, I)
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"x must have at least one step and one sequence; got shape "
                             f"{tuple(x.shape)} (time-major)")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x contains NaN or infinity; inputs must be finite")
        return x, batched

    def _prepare_state(self, state, batch: int, batched: bool, like: Tensor) -> RecurrentState:
        """Check a carried state against this layer and batch; ``None`` means zeros."""
        L, H = self.num_layers, self.hidden_size
        if state is None:
            zeros = like.new_zeros(L, batch, H)
            return RecurrentState(zeros, zeros, [None] * L, 0)
        if isinstance(state, tuple) and len(state) == 2:  # nn.LSTM's (h, c)
            state = RecurrentState(state[0], state[1], None, 0)
        if not isinstance(state, RecurrentState):
            raise TypeError(f"state must be a RecurrentState, an (h, c) tuple or None, got "
                            f"{type(state).__name__}")
        want = (L, batch, H) if batched else (L, H)
        for name in ("h", "c"):
            t = getattr(state, name)
            if not torch.is_tensor(t) or tuple(t.shape) != want:
                got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
                raise ValueError(f"state.{name} must have shape (num_layers, B, hidden_size) = "
                                 f"{want} for this layer and input; got {got} (a state from a "
                                 f"layer of another shape or another batch size?)")
            if t.dtype != like.dtype or t.device != like.device:
                raise TypeError(f"state.{name} is {t.dtype} on {t.device}; the layer is "
                                f"{like.dtype} on {like.device}")
        h, c = (state.h, state.c) if batched else (state.h.unsqueeze(1), state.c.unsqueeze(1))
        memory = state.memory if exists(state.memory) else [None] * L
        if len(memory) != L:
            raise ValueError(f"state.memory must hold one bank per layer ({L}); got {len(memory)}")
        for layer, bank in enumerate(memory):
            self._check_bank(layer, bank, batch)
        if not isinstance(state.step, int) or state.step < 0:
            raise ValueError(f"state.step must be an integer >= 0, got {state.step!r}")
        return RecurrentState(h, c, list(memory), state.step)

    def _check_bank(self, layer: int, bank, batch: int) -> None:
        if bank is None:
            return
        if not isinstance(bank, MemoryBank):
            raise TypeError(f"state.memory[{layer}] must be a MemoryBank or None, got "
                            f"{type(bank).__name__}")

    def _finish_state(self, h: Tensor, c: Tensor, memory, step: int, batched: bool):
        if not batched:
            h, c = h.squeeze(1), c.squeeze(1)  # (L, 1, H) -> (L, H)
        return RecurrentState(h, c, memory, step)

    def _finish_output(self, out: Tensor, batched: bool) -> Tensor:
        if not batched:
            return out.squeeze(1)  # (T, 1, H) -> (T, H)
        return out.transpose(0, 1) if self.batch_first else out  # (B, T, H) / (T, B, H)

    def _finish_record(self, rec: AttentionRecord, batched: bool) -> AttentionRecord:
        def fix(t):
            if not batched:
                return t.squeeze(1)
            return t.transpose(0, 1) if self.batch_first else t
        return AttentionRecord(fix(rec.summary), fix(rec.weights), fix(rec.indices),
                               fix(rec.memory_steps), rec.steps)

    def init_lstm_weights(self) -> None:
        """nn.LSTM's initialisation: U(-1/√H, 1/√H) for every weight and bias of the cell."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for name, p in self.named_parameters():
            if name.startswith(("weight_ih", "weight_hh", "bias_ih", "bias_hh")):
                nn.init.uniform_(p, -bound, bound)


class SABLSTM(RecurrentLayerBase):
    """LSTM with Sparse Attentive Backtracking; put it where ``nn.LSTM`` stood.

    Args:
        input_size, hidden_size, num_layers, batch_first, dropout: as nn.LSTM (dropout between
            layers).
        k_trunc: local truncation — the recurrent path is cut at global steps ``t % k_trunc == 0``
            (SPEC §3). ``None``: never cut.
        k_top: memories retrieved per step (SPEC §2.4); ``0`` turns attention off (then the layer
            is exactly an LSTM trained with TBPTT(k_trunc)).
        k_att: a memory is written after every k_att-th step (SPEC §2.2).
        att_hidden: hidden width d_att of the MLP scorer (default ``hidden_size``).
        max_memories: keep at most this many memories per layer; a write to a full memory evicts
            the oldest one (for endless streams). ``None``: unbounded.
        scorer: ``"mlp"`` (SPEC §2.3), ``"dot"`` (a cheaper query-dependent scorer, an option)
            or ``"release"`` (the authors' linear scorer, SPEC §8.2 — for comparison only: it
            ignores the current state).
        att_eps: the ε of the paper's ``w = ã / (Σã + ε)`` (SPEC §2.4). ``0`` (default):
            exact normalisation, weights sum to 1; ``> 0`` bounds the weights' sensitivity to
            near-ties at the threshold (``∂w/∂a ≲ 2/ε``), at the price of weights summing to
            slightly less than 1.
        fused_scorer: rank the memories with a kernel compiled by ``torch.compile`` (MLP scorer;
            compiles once per process, worth it at long T where the ranking dominates).
        block_score_grad: ``False`` (default, SPEC §3): a loss reaches the selected memories and
            ĥ(t) both through the summary's values and through the attention scores.  ``True``:
            the scores send gradient to the scorer's parameters only (the scorer reads ĥ and the
            memories detached, as the authors' ``block_attn_grad_past`` option); memories still
            get their credit through ``s(t) = Σ w_i m_i``.  Through the scores the credit of a
            hop is scaled by ``|m_i − s| / Σã``, which compounds over the hops of a memory chain
            and made copying T=100 overflow to an infinite gradient within 300 steps; with the
            scores blocked a hop scales credit by ``w_i ≤ 1`` (README, "Training stability").
        delta_grad: with ``block_score_grad=True`` only. ``False`` (default, SPEC §2.4): the
            threshold δ is a constant in the backward pass.  ``True``: δ — the (k_top+1)-th
            memory's score — passes its gradient on to the scorer's parameters (never to a
            memory: its key is recomputed from the stored value), so the scorer's gradient is
            the true derivative of the weights (the authors' code, whose δ is a differentiable
            ``topk`` value, does the same).  With δ constant, raising every kept score relative
            to δ looks like a way to change the weights, which it is not: on copying T=100 that
            spurious gradient went into the MLP's ``v``, hundreds of times the rest of the gradient, and
            grew ``|v|`` at Adam's full rate (README, "Training stability").

    ``output, state = layer(x, state=None)``; ``x`` is (T, B, I), (B, T, I) with batch_first, or
    unbatched (T, I); ``output`` is h(t) of the last layer, (T, B, H).  With
    ``return_attention=True`` a third value, one :class:`AttentionRecord` per layer, holds the
    summaries s(t), the sparse weights and the ids and write steps of the selected memories.

    With autograd on, each layer runs a chunk as one autograd node with a hand-written backward
    (``sab.fused``: the same selections, forward and gradients to rounding, faster steps);
    set ``layer.fast_path = False`` for the generic per-step graph.
    """

    dense = False  # the self-attention baseline sets this: softmax over every memory
    # train through ``sab.fused`` (one autograd node per layer and chunk, a hand-written backward)
    # where it applies; ``False`` forces the generic per-step graph (the tests' oracle)
    fast_path = True

    def __init__(self, input_size: int, hidden_size: int, *, k_trunc: Optional[int], k_top: int,
                 k_att: int, num_layers: int = 1, batch_first: bool = False,
                 att_hidden: Optional[int] = None, max_memories: Optional[int] = None,
                 dropout: float = 0.0, scorer: str = "mlp", fused_scorer: bool = False,
                 att_eps: float = 0.0, block_score_grad: bool = False, delta_grad: bool = False,
                 device=None, dtype=None):
        super().__init__()
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        _check_int("num_layers", num_layers, 1)
        _check_int("k_trunc", k_trunc, 1, allow_none=True)
        _check_int("k_top", k_top, 0)
        _check_int("k_att", k_att, 1)
        _check_int("att_hidden", att_hidden, 1, allow_none=True)
        _check_int("max_memories", max_memories, 1, allow_none=True)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
        if not (isinstance(att_eps, (int, float)) and att_eps >= 0):
            raise ValueError(f"att_eps must be a number >= 0, got {att_eps!r}")
        self.att_eps = float(att_eps)
        if not isinstance(block_score_grad, bool):
            raise ValueError(f"block_score_grad must be True or False, got {block_score_grad!r}")
        self.block_score_grad = block_score_grad
        if not isinstance(delta_grad, bool):
            raise ValueError(f"delta_grad must be True or False, got {delta_grad!r}")
        if delta_grad and not block_score_grad:
            raise ValueError("delta_grad=True needs block_score_grad=True: with the scores' "
                             "credit going into the memories, δ's gradient would credit the "
                             "(k_top+1)-th memory, which SPEC §3 forbids")
        self.delta_grad = delta_grad
        if scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {sorted(SCORERS)}, got {scorer!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.k_trunc, self.k_top, self.k_att = k_trunc, k_top, k_att
        self.att_hidden = att_hidden if exists(att_hidden) else hidden_size
        self.max_memories, self.batch_first, self.dropout = max_memories, batch_first, dropout
        self.scorer_name = scorer
        kw = dict(device=device, dtype=dtype)
        H = hidden_size
        for layer in range(num_layers):
            fan_in = input_size if layer == 0 else H
            self.register_parameter(f"weight_ih_l{layer}", nn.Parameter(torch.empty(4 * H, fan_in, **kw)))
            self.register_parameter(f"weight_hh_l{layer}", nn.Parameter(torch.empty(4 * H, H, **kw)))
            self.register_parameter(f"bias_ih_l{layer}", nn.Parameter(torch.empty(4 * H, **kw)))
            self.register_parameter(f"bias_hh_l{layer}", nn.Parameter(torch.empty(4 * H, **kw)))
        self.init_lstm_weights()
        self.scorers = nn.ModuleList(
            make_scorer(scorer, H, self.att_hidden) for _ in range(num_layers)) if self.attends \
            else nn.ModuleList()
        self.scorers.to(**kw)
        self.fused_scorer = bool(fused_scorer)
        for sc in self.scorers:
            if hasattr(sc, "fused"):
                sc.fused = self.fused_scorer

    @property
    def attends(self) -> bool:
        return self.dense or self.k_top > 0

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"k_trunc={self.k_trunc}, k_top={self.k_top}, k_att={self.k_att}, "
                f"att_hidden={self.att_hidden}, max_memories={self.max_memories}, "
                f"scorer={self.scorer_name!r}, att_eps={self.att_eps}, "
                f"block_score_grad={self.block_score_grad}, delta_grad={self.delta_grad}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}")

    def cell_weights(self, layer: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return (getattr(self, f"weight_ih_l{layer}"), getattr(self, f"weight_hh_l{layer}"),
                getattr(self, f"bias_ih_l{layer}"), getattr(self, f"bias_hh_l{layer}"))

    def _check_bank(self, layer: int, bank, batch: int) -> None:
        super()._check_bank(layer, bank, batch)
        if bank is None:
            return
        want = (batch, self.hidden_size, self.scorers[layer].key_size if self.attends else None)
        got = (bank.batch_size, bank.hidden_size, bank.key_size)
        if self.attends and got != want:
            raise ValueError(f"state.memory[{layer}] holds memories of (batch, hidden, key) = "
                             f"{got}; this layer and input need {want} (a state from a layer of "
                             f"another shape or another batch size?)")

    def empty_memory(self, layer: int, batch: int, like: Tensor) -> MemoryBank:
        return MemoryBank.empty(batch, self.hidden_size, self.scorers[layer].key_size,
                                max_memories=self.max_memories, device=like.device,
                                dtype=like.dtype)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, state: Union[RecurrentState, tuple, None] = None,
                return_attention: bool = False):
        x, batched = self._prepare_input(x)  # (T, B, I)
        T, B, _ = x.shape
        st = self._prepare_state(state, B, batched, x)
        hs, cs, banks, records = [], [], [], []
        layer_in = x
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                layer_in = F.dropout(layer_in, self.dropout, training=True)
            bank = st.memory[layer]
            if self.attends:
                bank = self.empty_memory(layer, B, x) if bank is None else bank.fork()
            layer_in, h, c, rec = self._run_layer(layer, layer_in, st.h[layer], st.c[layer], bank,
                                                  st.step, return_attention)
            hs.append(h)
            cs.append(c)
            banks.append(bank)
            records.append(rec)
        new_state = self._finish_state(torch.stack(hs), torch.stack(cs), banks, st.step + T,
                                       batched)  # (L, B, H)
        output = self._finish_output(layer_in, batched)
        if return_attention:
            return output, new_state, [self._finish_record(r, batched) for r in records]
        return output, new_state

    def _run_layer(self, layer: int, x: Tensor, h: Tensor, c: Tensor, bank: Optional[MemoryBank],
                   step0: int, record: bool, log: Optional["ForwardLog"] = None,
                   replay=None, keep_outputs: bool = True):
        """One layer over the whole chunk: x (T, B, I) -> outputs (T, B, H).

        What the sparse engine needs to recompute a block later: ``log``, if given, receives the
        state at the start of every truncation block (and at step 0) and the ranking of every
        step that attended; ``replay`` (an iterator over such rankings) makes a recomputation
        reuse them instead of scoring every memory again; ``keep_outputs=False`` returns no
        outputs (the sparse engine's top layer recomputes them).
        """
        w_ih, w_hh, b_ih, b_hh = self.cell_weights(layer)
        bias = b_ih + b_hh
        scorer = self.scorers[layer] if self.attends else None
        # sab.fused's settings: the layer's, this chunk's
        fused = (scorer, bank, step0, self.k_trunc, self.k_top, self.k_att, self.att_eps,
                 self.delta_grad, self.block_score_grad, self.dense, record)
        if self._fused_applies(scorer, x, log, keep_outputs):
            out, c, rec = fused_layer(F.linear(x, w_ih, bias), h, c, w_hh, *fused, replay)
            return out, out[-1], c, rec  # (T, B, H) from the projected input (T, B, 4H)
        if self._fused_forward_applies(scorer, x, replay):  # no autograd: the same steps
            return fused_forward(_projected(x, w_ih, bias), x.shape[0], h, c, w_hh, *fused, log,
                                 keep_outputs)
        w_hh_t = w_hh.t()  # (H, 4H)
        outs: List[Tensor] = []
        rec = _Recorder(self.k_top) if record else None
        for t, xp_t in enumerate(_projected(x, w_ih, bias)):
            g = step0 + t
            cut = exists(self.k_trunc) and g % self.k_trunc == 0
            if cut:
                h, c = h.detach(), c.detach()  # block truncation (SPEC §3)
            if exists(log) and (cut or t == 0):
                log.add_boundary(t, h, c, bank)
            h_hat, c = lstm_pointwise(torch.addmm(xp_t, h, w_hh_t), c)  # (B, H)
            if exists(scorer) and bank.count > 0:
                att = attend(scorer, h_hat, bank, self.k_top, self.dense,
                             next(replay) if exists(replay) else None, self.att_eps,
                             self.block_score_grad, self.delta_grad)
                if exists(log):
                    log.add_selection(att.selection)
                h = h_hat + att.summary  # (B, H)
                if exists(rec):
                    rec.add(att, bank)
            else:
                h = h_hat
                if exists(rec):
                    rec.add_empty(h_hat)
            if exists(scorer) and (g + 1) % self.k_att == 0:
                # memories keep their graph (SPEC §3); blocked scores: the key's only to W_k
                bank.write(h, scorer.keys(h.detach() if self.block_score_grad else h), g)
            if keep_outputs:
                outs.append(h)
        out = torch.stack(outs) if keep_outputs else None  # (T, B, H)
        return out, h, c, (rec.finish(step0) if exists(rec) else None)

    def _fused_applies(self, scorer, x: Tensor, log, keep_outputs: bool) -> bool:
        """Whether ``sab.fused`` computes this layer's chunk: autograd on, the MLP scorer (sparse
        or dense attention) — the reference engine's chunks and the sparse engine's
        recomputations of a block (which replay the logged rankings); not the sparse engine's
        graph-free forward (it logs)."""
        return (self.fast_path and torch.is_grad_enabled() and type(scorer) is MLPScorer
                and log is None and keep_outputs
                and x.shape[0] > 0)

    def _fused_forward_applies(self, scorer, x: Tensor, replay) -> bool:
        """Whether ``sab.fused``'s forward computes this layer's chunk without autograd:
        evaluation and the sparse engine's graph-free forward (which logs), MLP scorer."""
        return (self.fast_path and not torch.is_grad_enabled() and type(scorer) is MLPScorer
                and replay is None and x.shape[0] > 0)


PROJECTION_SLAB = 256  # steps whose input projection is computed in one matrix product


def _projected(x: Tensor, w_ih: Tensor, bias: Tensor):
    """x W_ihᵀ + b per step, (B, 4H) each, computed a slab of steps at a time: one matrix product
    per slab, but never the (T, B, 4H) projection of a whole long sequence at once; ``unbind``
    within a slab (indexing a tensor that requires grad step by step is quadratic, SPEC §9)."""
    for start in range(0, x.shape[0], PROJECTION_SLAB):
        slab = F.linear(x[start:start + PROJECTION_SLAB], w_ih, bias)  # (S, B, 4H)
        yield from slab.unbind(0)


class Boundary(NamedTuple):
    """The start of a truncation block: its first step (in the chunk), the memory window then
    (linear bank: head, count, next_id), and how many rankings had been logged before it.  The
    (detached) state entering it is ``ForwardLog.state(index)``."""

    index: int
    t: int
    head: int
    count: int
    next_id: int
    selection_index: int


class ForwardLog:
    """What the sparse engine keeps of one layer's graph-free forward pass to recompute any
    block later: the (h, c) entering every truncation block and the ranking of every step that
    attended, each written into a buffer allocated once per chunk.  (Kept as thousands of small
    tensors, these fragmented the CPU heap: the process's RSS was twice the tensors' size.)
    """

    def __init__(self, T: int, batch: int, hidden: int, k_trunc: Optional[int], k_top: int,
                 like: Tensor):
        n_blocks = 1 if k_trunc is None else 1 + math.ceil(T / k_trunc)
        self.h = like.new_empty(n_blocks, batch, hidden)  # (blocks, B, H)
        self.c = like.new_empty(n_blocks, batch, hidden)
        self.top = like.new_empty(T, batch, k_top + 1)  # (T, B, k+1) the best scores and δ
        # (T, B, k+1) slots of the k_top best memories and of δ's
        self.slots = torch.empty(T, batch, k_top + 1, dtype=torch.long, device=like.device)
        self.boundaries: List[Boundary] = []
        self.n_selections = 0

    def add_boundary(self, t: int, h: Tensor, c: Tensor, bank: Optional[MemoryBank]) -> None:
        i = len(self.boundaries)
        self.h[i].copy_(h)
        self.c[i].copy_(c)
        window = (0, 0, 0) if bank is None else (bank.head, bank.count, bank.next_id)
        self.boundaries.append(Boundary(i, t, *window, self.n_selections))

    def add_selection(self, selection: Optional[Selection]) -> None:
        # None (every memory read: n <= k_top) leaves its row unwritten; ``attend`` ignores the
        # replayed ranking in that case, so the replay stays in step
        if selection is not None:
            self.top[self.n_selections].copy_(selection.top)
            self.slots[self.n_selections].copy_(selection.slots)
        self.n_selections += 1

    def state(self, index: int) -> tuple[Tensor, Tensor]:
        """(h, c) entering the block ``index``, each (B, H)."""
        return self.h[index], self.c[index]

    def replay(self, start: int, stop: int):
        """The rankings logged between ``start`` and ``stop``, in order, as ``Selection``."""
        for i in range(start, stop):
            yield Selection(self.top[i], self.slots[i])


class _Recorder:
    """Collects what attention did at each step into an :class:`AttentionRecord`."""

    def __init__(self, k_top: int):
        self.k_top = k_top
        self.rows: list = []

    def add(self, att, bank: MemoryBank) -> None:
        slots = att.slots  # (B, m)
        self.rows.append((att.summary, att.weights.detach(), bank.slot_ids[slots],
                          bank.slot_steps[slots]))

    def add_empty(self, like: Tensor) -> None:
        B = like.shape[0]
        none = torch.empty(B, 0, dtype=torch.long, device=like.device)
        self.rows.append((torch.zeros_like(like), like.new_zeros(B, 0), none, none))

    def finish(self, step0: int) -> AttentionRecord:
        width = max(self.k_top, max(r[1].shape[1] for r in self.rows))
        summary = torch.stack([r[0] for r in self.rows])  # (T, B, H)

        def padded(i: int, fill) -> Tensor:
            return torch.stack([F.pad(r[i], (0, width - r[i].shape[1]), value=fill)
                                for r in self.rows])  # (T, B, K)

        steps = torch.arange(step0, step0 + len(self.rows), device=summary.device)
        return AttentionRecord(summary, padded(1, 0.0), padded(2, -1), padded(3, -1), steps)
