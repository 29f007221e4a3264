"""Build any of the four recurrent models by name (for the trainer and the command line)."""
from __future__ import annotations

import inspect

from torch import nn

from .baselines import LSTM, SelfAttnLSTM, TBPTTLSTM
from .layer import SABLSTM

__all__ = ["MODELS", "build_rnn", "model_arguments"]

MODELS = {"sab": SABLSTM, "lstm": LSTM, "tbptt": TBPTTLSTM, "selfattn": SelfAttnLSTM}


def model_arguments(name: str) -> list[str]:
    """The keyword arguments model ``name`` takes (besides input_size and hidden_size)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    params = inspect.signature(MODELS[name].__init__).parameters
    return [p for p in params if p not in ("self", "input_size", "hidden_size")]


def build_rnn(name: str, input_size: int, hidden_size: int, **kwargs) -> nn.Module:
    """``build_rnn("sab", 1, 128, k_trunc=5, k_top=5, k_att=2)`` and likewise for
    ``"lstm"``, ``"tbptt"`` (needs ``k_trunc``) and ``"selfattn"``."""
    allowed = model_arguments(name)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"model {name!r} does not take {', '.join(unknown)}; it takes "
                         f"{', '.join(allowed)}")
    return MODELS[name](input_size, hidden_size, **kwargs)
