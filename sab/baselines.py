"""The paper's three baselines with SABLSTM's calling convention (SPEC §5).

* :class:`LSTM` — full BPTT, the fused ``nn.LSTM``.
* :class:`TBPTTLSTM` — the fused ``nn.LSTM`` run block by block, the state detached at global steps
  ``t % k_trunc == 0``: the same block truncation as SABLSTM (and exactly SABLSTM with
  ``k_top=0``).
* :class:`SelfAttnLSTM` — an LSTM with dense softmax self-attention over *all* past hidden states
  (every step is a memory), the same MLP scorer, trained with full BPTT.

All take and return a :class:`~sab.state.RecurrentState` and accept ``return_attention=True`` (the
LSTMs then report a zero summary and no memories, so task heads can read ``[h(t); s(t)]`` for every
model alike).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .layer import RecurrentLayerBase, SABLSTM, _check_int
from .state import AttentionRecord

__all__ = ["LSTM", "TBPTTLSTM", "SelfAttnLSTM"]


class LSTM(RecurrentLayerBase):
    """LSTM trained with full backpropagation through time (fused ``nn.LSTM``)."""

    def __init__(self, input_size: int, hidden_size: int, *, num_layers: int = 1,
                 batch_first: bool = False, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        _check_int("input_size", input_size, 1)
        _check_int("hidden_size", hidden_size, 1)
        _check_int("num_layers", num_layers, 1)
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first = batch_first
        # time-major inside; batch_first is handled by the shared input/output helpers
        self.lstm = nn.LSTM(input_size, hidden_size, num_layers, dropout=dropout,
                            device=device, dtype=dtype)

    def _run(self, x: Tensor, h: Tensor, c: Tensor, step0: int):
        out, (h, c) = self.lstm(x, (h, c))  # (T, B, H), (L, B, H)
        return out, h, c

    def forward(self, x: Tensor, state=None, return_attention: bool = False):
        x, batched = self._prepare_input(x)  # (T, B, I)
        T, B, _ = x.shape
        st = self._prepare_state(state, B, batched, x)
        out, h, c = self._run(x, st.h, st.c, st.step)
        new_state = self._finish_state(h, c, None, st.step + T, batched)
        output = self._finish_output(out, batched)
        if not return_attention:
            return output, new_state
        none = torch.empty(T, B, 0, dtype=torch.long, device=x.device)
        rec = AttentionRecord(torch.zeros_like(out), out.new_zeros(T, B, 0), none, none,
                              torch.arange(st.step, st.step + T, device=x.device))
        return output, new_state, [self._finish_record(rec, batched)] * self.num_layers


class TBPTTLSTM(LSTM):
    """LSTM trained with truncated BPTT(k_trunc): block truncation on the global step counter."""

    def __init__(self, input_size: int, hidden_size: int, *, k_trunc: int, num_layers: int = 1,
                 batch_first: bool = False, dropout: float = 0.0, device=None, dtype=None):
        _check_int("k_trunc", k_trunc, 1)
        super().__init__(input_size, hidden_size, num_layers=num_layers, batch_first=batch_first,
                         dropout=dropout, device=device, dtype=dtype)
        self.k_trunc = k_trunc

    def _run(self, x: Tensor, h: Tensor, c: Tensor, step0: int):
        outs, t, T = [], 0, x.shape[0]
        while t < T:
            g = step0 + t
            if g % self.k_trunc == 0:
                h, c = h.detach(), c.detach()
            end = min(T, t + self.k_trunc - g % self.k_trunc)  # up to the next block boundary
            out, (h, c) = self.lstm(x[t:end], (h, c))  # (end - t, B, H)
            outs.append(out)
            t = end
        return torch.cat(outs), h, c


class SelfAttnLSTM(SABLSTM):
    """LSTM + dense softmax self-attention over every past hidden state, full BPTT (SPEC §5).

    Every step writes a memory (k_att = 1), nothing is truncated, and the summary is the softmax
    of the same MLP scores over all memories — the paper's "LSTM + full self-attention".
    """

    dense = True

    def __init__(self, input_size: int, hidden_size: int, *, num_layers: int = 1,
                 batch_first: bool = False, att_hidden: Optional[int] = None,
                 max_memories: Optional[int] = None, dropout: float = 0.0, scorer: str = "mlp",
                 device=None, dtype=None):
        super().__init__(input_size, hidden_size, k_trunc=None, k_top=0, k_att=1,
                         num_layers=num_layers, batch_first=batch_first, att_hidden=att_hidden,
                         max_memories=max_memories, dropout=dropout, scorer=scorer,
                         device=device, dtype=dtype)
