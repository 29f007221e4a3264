"""Task heads outside the recurrent layer (SPEC §2.7): a readout of ``[h(t); s(t)]``.

The authors' heads read the hidden state and the attention summary side by side; the LSTM
baselines have no summary and read zeros in its place, so every model gets the same head and the
same number of head parameters.

``SequenceModel(rnn, output_size)`` keeps the recurrent layer and the head together (one
``state_dict``, one optimizer, one DDP wrapper), but the head is *not* applied in ``forward``:
``forward`` is the recurrent layer's, so the engines (``sab.engines``) run the layer and hand each
step range's ``output`` and ``summary`` to the task's loss callback, which calls ``readout``.
Copying reads every step (a per-step classifier); adding reads only the last step (a regressor).

Token inputs (character-level language modelling, SPEC §6) go through an optional embedding
first: ``encode`` maps token ids (T, B) to vectors (T, B, E) and is the identity for tasks that feed
vectors.  ``forward`` encodes then runs the layer; the trainer calls ``encode`` itself and hands
the embedded chunk to the engines (``x.requires_grad``: both engines send the input's gradient
back into the embedding).  The embedding is a submodule, so it is in ``state_dict`` and the
checkpoints.
"""
from __future__ import annotations

import torch
from typing import Optional

from torch import Tensor, nn

__all__ = ["SequenceModel"]


class SequenceModel(nn.Module):
    """A recurrent layer (any of ``sab.MODELS``) and a linear head on ``[h(t); s(t)]``, with an
    optional input embedding (``nn.Embedding(vocab, rnn.input_size)``) for token inputs."""

    batch_first = False  # the engines take time-major chunks

    def __init__(self, rnn: nn.Module, output_size: int, embedding: Optional[nn.Embedding] = None):
        super().__init__()
        if getattr(rnn, "batch_first", False):
            raise ValueError("SequenceModel needs a time-major layer (batch_first=False)")
        self.embedding = embedding
        self.rnn = rnn
        H = rnn.hidden_size
        self.head = nn.Linear(2 * H, output_size)

    @property
    def hidden_size(self) -> int:
        return self.rnn.hidden_size

    def encode(self, x: Tensor) -> Tensor:
        """Token ids (T, B) -> embeddings (T, B, E); vectors (T, B, I) pass unchanged."""
        return x if self.embedding is None else self.embedding(x)  # (T, B) -> (T, B, E)

    def forward(self, x: Tensor, state=None, return_attention: bool = False):
        """Encode, then the recurrent layer's forward: ``x`` (T, B, I) or token ids (T, B) ->
        h(t) (T, B, H), state[, records]."""
        return self.rnn(self.encode(x), state, return_attention=return_attention)

    def readout(self, output: Tensor, summary: Tensor) -> Tensor:
        """Head on ``[h(t); s(t)]``: (T, B, H) and (T, B, H) -> (T, B, output_size)."""
        return self.head(torch.cat([output, summary], dim=-1))  # (T, B, 2H) -> (T, B, out)
