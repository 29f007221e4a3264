"""The data layer of `sab` (SPEC §6, §10): local files only, verified before use.

It sits at the bottom of the package and imports nothing else from `sab`.

    from sab.data import load_char_corpus, batchify, iter_windows, bits_per_char
    corpus = load_char_corpus("ptb_char")          # vocab 50, train (5017482,) int64
    batched = batchify(corpus.train, 32)           # (N, 32)
    for x, y in iter_windows(batched, 100): ...    # (100, 32), (100, 32)

    from sab.data import load_sequential, BatchIterator
    splits = load_sequential("fashion_mnist", permuted=True, seed=1234)
    it = BatchIterator(splits["train"], 64, torch.Generator().manual_seed(0))
    for x, y in it: ...                            # (784, 64, 1) float32, (64,) int64
"""
from .check import CheckReport, check
from .cli import add_data_commands, main
from .errors import BadFileError, ChecksumError, DataError, DownloadError, MissingFileError
from .fetch import download, fetch
from .formats import (EOS, encode_idx, parse_cifar_batch, parse_idx, parse_ptb_char,
                      read_cifar10_archive, read_cifar10_folder, read_idx, read_idx_pair,
                      read_ptb_char, read_text8, split_text8)
from .images import (BatchIterator, SequentialImages, channel_stats, images_to_sequences,
                     load_image_splits, load_sequential, pixel_permutation)
from .integrity import inspect_dataset, locate, verify_file
from .prepare import prepare, ptb_words_to_chars
from .registry import REGISTRY, DatasetSpec, FileSpec, Layout, Slot, data_root, get_spec
from .text import CharCorpus, CharVocab, batchify, bits_per_char, iter_windows, load_char_corpus

__all__ = [
    "BadFileError", "BatchIterator", "CharCorpus", "CharVocab", "CheckReport", "ChecksumError",
    "DataError", "DatasetSpec", "DownloadError", "EOS", "FileSpec", "Layout", "MissingFileError",
    "REGISTRY", "SequentialImages", "Slot", "add_data_commands", "batchify", "bits_per_char",
    "channel_stats", "check", "data_root", "download", "encode_idx", "fetch", "get_spec",
    "images_to_sequences", "inspect_dataset", "iter_windows", "load_char_corpus",
    "load_image_splits", "load_sequential", "locate", "main", "parse_cifar_batch", "parse_idx",
    "parse_ptb_char", "pixel_permutation", "prepare", "ptb_words_to_chars",
    "read_cifar10_archive", "read_cifar10_folder", "read_idx", "read_idx_pair", "read_ptb_char",
    "read_text8", "split_text8", "verify_file",
]
