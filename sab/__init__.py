"""Sparse Attentive Backtracking (Ke et al., NeurIPS 2018) in PyTorch.

Layering (each module imports only those above it in this list):
sparsifier, fastmath, memory → scorer, cell → state → layer (SABLSTM, the reference engine) → baselines →
models (build by name) → engines → tasks, heads → trainer → plots → cli (``sab`` command).
The training side is imported on demand: ``from sab.trainer import Trainer``.
"""
from .baselines import LSTM, SelfAttnLSTM, TBPTTLSTM
from .layer import SABLSTM
from .memory import MemoryBank
from .models import MODELS, build_rnn
from .sparsifier import sparsify, topk_select
from .state import AttentionRecord, RecurrentState

__version__ = "0.1.0"

__all__ = ["SABLSTM", "LSTM", "TBPTTLSTM", "SelfAttnLSTM", "MemoryBank", "RecurrentState",
           "AttentionRecord", "sparsify", "topk_select", "build_rnn", "MODELS"]
