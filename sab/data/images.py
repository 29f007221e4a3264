"""Sequential classification data: images read one pixel per step (SPEC §6: pixel-by-pixel MNIST,
permuted MNIST, sequential CIFAR-10; here also Fashion-MNIST and mnist5k).

- MNIST-like: T = 784 steps of C = 1 value, pixels in row-major order.
- CIFAR-10: T = 1024 steps of C = 3 values (red, green, blue of one pixel), row-major.
- Values: x / 255, then standardised per channel with the mean and standard deviation (population)
  of the training portion (the training file minus the validation hold-out), so no statistic sees
  validation or test images.
- Permuted variant: one fixed permutation of the T steps, `torch.randperm(T)` from
  `torch.Generator().manual_seed(seed)`; the seed is recorded on the dataset.
- Validation: the last `valid_size` images of the training file (default 5,000; 400 for mnist5k,
  whose files are class-interleaved so that any contiguous block is balanced). Deterministic, no
  seed involved.
- Batches are time-major like nn.LSTM: x (T, B, C) float32, y (B,) int64.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from .formats import read_cifar10_archive, read_cifar10_folder, read_idx_pair
from .integrity import layout_of, locate
from .registry import CIFAR10_BATCH_MD5, PathLike, get_spec
from .registry import data_root as resolve_root

DEFAULT_VALID_SIZE = {"mnist": 5000, "fashion_mnist": 5000, "cifar10": 5000, "mnist5k": 400}
DEFAULT_PERMUTATION_SEED = 1234


def load_image_splits(name: str, data_root: Optional[PathLike] = None, *, registry=None
                      ) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
    """{'train', 'test'} -> (images uint8, labels int64) of a verified image dataset.
    Images are (N, 28, 28) for IDX datasets and (N, 3, 32, 32) for CIFAR-10."""
    spec = get_spec(name, registry)
    files = locate(name, resolve_root(data_root), registry=registry)
    if spec.kind == "idx":
        return {"train": read_idx_pair(files["train_images"], files["train_labels"]),
                "test": read_idx_pair(files["test_images"], files["test_labels"])}
    if spec.kind == "cifar10":
        if layout_of(name, files, registry) == "tar.gz":
            return read_cifar10_archive(files["archive"], md5s=_cifar_md5s(spec))
        return read_cifar10_folder(files["data_batch_1"].parent, md5s=_cifar_md5s(spec))
    raise ValueError(f"{name} is not an image dataset (kind {spec.kind})")


def _cifar_md5s(spec) -> Dict[str, str]:
    folder = next((l for l in spec.layouts if l.name == "folder"), None)
    if folder is None:
        return CIFAR10_BATCH_MD5
    return {s.key: s.canonical.md5 for s in folder.slots if s.canonical.md5}


def images_to_sequences(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> uint8 sequences (N, T, C), pixels in row-major order."""
    if images.dim() == 3:  # (N, H, W): grey
        n, h, w = images.shape
        return images.reshape(n, h * w, 1)  # (N, T, 1)
    if images.dim() == 4:  # (N, C, H, W): colour
        n, c, h, w = images.shape
        return images.permute(0, 2, 3, 1).reshape(n, h * w, c)  # (N, H, W, C) -> (N, T, C)
    raise ValueError(f"expected (N, H, W) or (N, C, H, W) images, got {tuple(images.shape)}")


def pixel_permutation(seed: int, length: int) -> torch.Tensor:
    """The fixed permutation of the permuted task: randperm(length) from a generator seeded
    with `seed` (reproducible on any machine with the same torch CPU generator)."""
    return torch.randperm(length, generator=torch.Generator().manual_seed(int(seed)))


class SequentialImages:
    """Images as sequences, stored as uint8 (N, T, C) and normalised per batch.

    Build with `load_sequential` (reads the data root) or directly from tensors."""

    def __init__(self, sequences: torch.Tensor, labels: torch.Tensor, mean: torch.Tensor,
                 std: torch.Tensor, permutation: Optional[torch.Tensor] = None, *,
                 name: str = "", split: str = "", seed: Optional[int] = None,
                 num_classes: int = 10):
        if sequences.dim() != 3 or sequences.dtype != torch.uint8:
            raise ValueError("sequences must be uint8 (N, T, C)")
        if labels.shape != (sequences.shape[0],):
            raise ValueError("one label per sequence")
        self.sequences = sequences
        self.labels = labels.long()
        self.mean = mean.float()  # (C,)
        self.std = std.float()  # (C,)
        self.permutation = permutation
        self.name, self.split, self.seed = name, split, seed
        self.num_classes = num_classes

    @property
    def T(self) -> int:
        return self.sequences.shape[1]

    @property
    def C(self) -> int:
        return self.sequences.shape[2]

    def __len__(self) -> int:
        return self.sequences.shape[0]

    def get(self, index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Batch of the given indices: x (T, B, C) float32 time-major, y (B,) int64."""
        seq = self.sequences[index]  # (B, T, C) uint8
        if self.permutation is not None:
            seq = seq[:, self.permutation]  # (B, T, C), steps permuted
        x = (seq.float() / 255.0 - self.mean) / self.std  # (B, T, C)
        return x.transpose(0, 1).contiguous(), self.labels[index]  # (T, B, C), (B,)


def channel_stats(sequences: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and population std of x / 255 over a uint8 (N, T, C) tensor."""
    c = sequences.shape[2]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for chunk in sequences.split(4096):  # bounded memory for 50,000 CIFAR images
        v = chunk.double().reshape(-1, c) / 255.0  # (n*T, C)
        total += v.sum(0)
        total_sq += (v * v).sum(0)
    count = sequences.shape[0] * sequences.shape[1]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()


def load_sequential(name: str, data_root: Optional[PathLike] = None, *, permuted: bool = False,
                    seed: int = DEFAULT_PERMUTATION_SEED, valid_size: Optional[int] = None,
                    registry=None) -> Dict[str, SequentialImages]:
    """{'train', 'valid', 'test'} -> SequentialImages of an image dataset (see module doc).

    `valid_size` images at the end of the training file are held out as 'valid' (0: none).
    Normalisation statistics come from 'train' only; `permuted` applies
    `pixel_permutation(seed, T)` to every split.
    """
    splits = load_image_splits(name, data_root, registry=registry)
    tr_seq = images_to_sequences(splits["train"][0])  # (N, T, C)
    tr_lab = splits["train"][1]
    if valid_size is None:
        valid_size = DEFAULT_VALID_SIZE.get(name, 5000)
    if not 0 <= valid_size < tr_seq.shape[0]:
        raise ValueError(f"valid_size {valid_size} out of range for {tr_seq.shape[0]} images")
    cut = tr_seq.shape[0] - valid_size
    mean, std = channel_stats(tr_seq[:cut])
    perm = pixel_permutation(seed, tr_seq.shape[1]) if permuted else None
    common = dict(mean=mean, std=std, permutation=perm, name=name,
                  seed=seed if permuted else None)
    return {
        "train": SequentialImages(tr_seq[:cut], tr_lab[:cut], split="train", **common),
        "valid": SequentialImages(tr_seq[cut:], tr_lab[cut:], split="valid", **common),
        "test": SequentialImages(images_to_sequences(splits["test"][0]), splits["test"][1],
                                 split="test", **common),
    }


class BatchIterator:
    """Minibatches `(x (T, B, C), y (B,))` of a SequentialImages, shuffled by an explicit
    torch.Generator, resumable.

    Iterating runs through the rest of the current epoch and then advances `epoch`. The order of
    an epoch is `randperm(N)` drawn from the generator when the epoch starts; `state_dict()`
    records (epoch, index, generator state at the start of the epoch), so `load_state_dict()`
    redraws the same order and continues with batch `index`: a run that stops and resumes sees
    exactly the batches of a run that did not stop.
    """

    def __init__(self, dataset: SequentialImages, batch_size: int,
                 generator: Optional[torch.Generator] = None, *, shuffle: bool = True,
                 drop_last: bool = False):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.dataset = dataset
        self.batch_size = batch_size
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.index = 0  # batches already produced in the current epoch
        self._order: Optional[torch.Tensor] = None
        self._epoch_state: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _start_epoch(self) -> None:
        self._epoch_state = self.generator.get_state().clone()
        n = len(self.dataset)
        self._order = (torch.randperm(n, generator=self.generator) if self.shuffle
                       else torch.arange(n))

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        if self._order is None:
            self._start_epoch()
        assert self._order is not None
        while self.index < len(self):
            i = self.index
            idx = self._order[i * self.batch_size: (i + 1) * self.batch_size]
            self.index += 1
            yield self.dataset.get(idx)
        self.epoch += 1
        self.index = 0
        self._order = None

    def state_dict(self) -> Dict[str, object]:
        state = self._epoch_state if self._order is not None else self.generator.get_state()
        return {"epoch": self.epoch, "index": self.index, "generator_state": state.clone()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.generator.set_state(state["generator_state"])  # type: ignore[arg-type]
        self.epoch = int(state["epoch"])  # type: ignore[arg-type]
        self.index = int(state["index"])  # type: ignore[arg-type]
        self._order = None
        self._epoch_state = None
