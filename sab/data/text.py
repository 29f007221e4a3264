"""Character-level language modelling data: vocabulary, contiguous batch columns, truncation
windows, bits per character (SPEC §6: Penn Treebank characters and text8, "contiguous text, state
carried across chunks").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .errors import DataError
from .formats import read_ptb_char, read_text8, split_text8
from .integrity import locate
from .registry import PathLike, get_spec
from .registry import data_root as resolve_root


class CharVocab:
    """Token <-> index, built from the training split: the sorted set of its tokens, so the same
    text always gives the same indices. Tokens are characters, plus `<eos>` for PTB."""

    def __init__(self, itos: Sequence[str]):
        self.itos: List[str] = list(itos)
        self.stoi: Dict[str, int] = {s: i for i, s in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in the vocabulary")

    @classmethod
    def build(cls, tokens: Iterable[str]) -> "CharVocab":
        return cls(sorted(set(tokens)))

    def __len__(self) -> int:
        return len(self.itos)

    def __repr__(self) -> str:
        return f"CharVocab({len(self)} tokens: {''.join(t if len(t) == 1 else f'[{t}]' for t in self.itos)!r})"

    def encode(self, tokens: Union[Sequence[str], bytes], dtype: torch.dtype = torch.long
               ) -> torch.Tensor:
        """1-D tensor of indices. `tokens` is a sequence of tokens, or bytes of one-character
        tokens (fast path, used for text8's 100M characters). A token absent from the training
        vocabulary raises DataError naming it."""
        if isinstance(tokens, (bytes, bytearray)):
            lut = np.full(256, -1, dtype=np.int64)
            for s, i in self.stoi.items():
                if len(s) == 1 and ord(s) < 256:
                    lut[ord(s)] = i
            ids = lut[np.frombuffer(tokens, dtype=np.uint8)]
            if ids.size and ids.min() < 0:
                bad = bytes([np.frombuffer(tokens, dtype=np.uint8)[int(np.argmin(ids))]])
                raise DataError(f"character {bad!r} is not in the training vocabulary")
            return torch.from_numpy(ids).to(dtype)
        try:
            return torch.tensor([self.stoi[t] for t in tokens], dtype=dtype)
        except KeyError as e:
            raise DataError(f"token {e.args[0]!r} is not in the training vocabulary") from None

    def decode(self, ids: Union[torch.Tensor, Iterable[int]]) -> List[str]:
        return [self.itos[int(i)] for i in ids]


@dataclass
class CharCorpus:
    """A character corpus split train / valid / test, encoded with the training vocabulary."""

    name: str
    vocab: CharVocab
    train: torch.Tensor  # (N_train,)
    valid: torch.Tensor  # (N_valid,)
    test: torch.Tensor  # (N_test,)

    def split(self, name: str) -> torch.Tensor:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def load_char_corpus(name: str, data_root: Optional[PathLike] = None, *,
                     dtype: torch.dtype = torch.long, registry=None) -> CharCorpus:
    """Load `ptb_char` or `text8` from the data root (verified first; see SPEC §10).

    ptb_char: tokens are the characters of each line plus `<eos>` at each line end (see
    `formats.parse_ptb_char`). text8: the characters, split 90M / 5M / 5M. Pass
    `dtype=torch.uint8` for text8 to hold 100 MB instead of 800 MB; `iter_windows` returns
    int64 windows whatever the storage type.
    """
    spec = get_spec(name, registry)
    files = locate(name, resolve_root(data_root), registry=registry)
    if spec.kind == "ptb_char":
        toks = {s: read_ptb_char(files[s]) for s in ("train", "valid", "test")}
        vocab = CharVocab.build(toks["train"])
        enc = {s: vocab.encode(t, dtype) for s, t in toks.items()}
    elif spec.kind == "text8":
        parts = split_text8(read_text8(files["text"]), spec.extra.get("split", (90_000_000,
                                                                               5_000_000,
                                                                               5_000_000)))
        vocab = CharVocab.build(chr(b) for b in set(parts["train"]))
        enc = {s: vocab.encode(t, dtype) for s, t in parts.items()}
    else:
        raise ValueError(f"{name} is not a character corpus (kind {spec.kind})")
    return CharCorpus(name, vocab, enc["train"], enc["valid"], enc["test"])


def batchify(data: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Cut a 1-D token stream into `batch_size` contiguous columns, shape (N, B), dropping the
    tail that does not fill a whole row (as in the PyTorch word_language_model example).

    With the alphabet as the stream and batch_size 4::

        a b c d e f g h i j k l m n o p q r s t u v w x y z
        ┌ a g m s ┐
        │ b h n t │
        │ c i o u │      column j holds the stream's j-th quarter, in order, so a model
        │ d j p v │      that carries its state down a column reads contiguous text;
        │ e k q w │      the columns are independent sequences (the batch).
        └ f l r x ┘      y z: dropped (26 = 4 * 6 + 2)
    """
    if data.dim() != 1:
        raise ValueError(f"batchify expects a 1-D stream, got shape {tuple(data.shape)}")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = data.numel() // batch_size
    if n == 0:
        raise ValueError(f"stream of {data.numel()} tokens is shorter than batch_size "
                         f"{batch_size}")
    return data[: n * batch_size].view(batch_size, n).t().contiguous()  # (B, N) -> (N, B)


def iter_windows(batched: torch.Tensor, seq_len: int, start: int = 0
                 ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Truncation windows `(x, y)` over batch columns `(N, B)`: x = rows i .. i+L-1, y = rows
    i+1 .. i+L (the next token), both `(L, B)` int64, for i = start, start+L, ... The last window
    may be shorter (N-1 is not always a multiple of L). A model carries its state from one window
    to the next (detaching it: `repackage_hidden` in the PyTorch example), so together the
    windows cover each column once::

        rows   0 1 2 3 | 4 5 6 7 | 8 9
        x      0 1 2 3 | 4 5 6 7 | 8        (L = 4, N = 10)
        y      1 2 3 4 | 5 6 7 8 | 9
    """
    if seq_len < 1:
        raise ValueError("seq_len must be >= 1")
    n = batched.size(0)
    for i in range(start, n - 1, seq_len):
        length = min(seq_len, n - 1 - i)
        x = batched[i: i + length].long()  # (L, B)
        y = batched[i + 1: i + 1 + length].long()  # (L, B)
        yield x, y


def bits_per_char(total_nll_nats: float, n_chars: int) -> float:
    """Bits per character: total negative log-likelihood in nats over `n_chars` predictions,
    divided by n * ln 2 (SPEC §6)."""
    if n_chars <= 0:
        raise ValueError("n_chars must be positive")
    return float(total_nll_nats) / (n_chars * math.log(2))
