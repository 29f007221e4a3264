"""Sequential images: shapes, normalisation, permutation, validation split, resumable batches."""
import pytest
import torch

from _data_fixtures import write_cifar, write_idx_dataset
from sab.data import (BatchIterator, SequentialImages, channel_stats, load_sequential,
                      pixel_permutation)


def test_permutation_reproducible_from_seed():
    p = pixel_permutation(1234, 784)
    assert torch.equal(p, pixel_permutation(1234, 784))
    assert not torch.equal(p, pixel_permutation(1235, 784))
    assert torch.equal(p.sort().values, torch.arange(784))
    torch.manual_seed(99)  # the global RNG plays no part
    assert torch.equal(p, pixel_permutation(1234, 784))


def test_sequential_idx_splits_shapes_and_stats(tmp_path):
    spec, arrays = write_idx_dataset(tmp_path)
    s = load_sequential("tiny", tmp_path, valid_size=2, registry={"tiny": spec})
    assert (len(s["train"]), len(s["valid"]), len(s["test"])) == (4, 2, 4)
    assert s["valid"].labels.tolist() == [4, 5]  # the last 2 of the training file
    tr = torch.from_numpy(arrays["train"][0][:4]).double() / 255
    assert s["train"].mean.item() == pytest.approx(tr.mean().item(), rel=1e-5)
    assert s["train"].std.item() == pytest.approx(tr.std(unbiased=False).item(), rel=1e-5)
    assert s["test"].mean is s["train"].mean  # one set of statistics, from train only
    x, y = s["train"].get(torch.tensor([0, 3]))
    assert x.shape == (784, 2, 1) and x.dtype == torch.float32 and y.tolist() == [0, 3]
    # step t is pixel (t // 28, t % 28), normalised
    expect = (arrays["train"][0][3, 5, 7] / 255 - s["train"].mean) / s["train"].std
    assert x[5 * 28 + 7, 1, 0].item() == pytest.approx(expect.item(), rel=1e-5)


def test_permuted_variant_is_the_permuted_sequence(tmp_path):
    spec, _ = write_idx_dataset(tmp_path)
    plain = load_sequential("tiny", tmp_path, valid_size=1, registry={"tiny": spec})
    perm = load_sequential("tiny", tmp_path, valid_size=1, permuted=True, seed=7,
                           registry={"tiny": spec})
    assert perm["train"].seed == 7 and plain["train"].permutation is None
    p = pixel_permutation(7, 784)
    idx = torch.arange(3)
    assert torch.equal(perm["test"].get(idx)[0], plain["test"].get(idx)[0][p])


def test_sequential_cifar(tmp_path):
    spec, _, _ = write_cifar(tmp_path)
    s = load_sequential("tinycifar", tmp_path, valid_size=2, registry={"tinycifar": spec})
    assert (len(s["train"]), len(s["valid"]), len(s["test"])) == (8, 2, 2)
    assert s["train"].T == 1024 and s["train"].C == 3 and s["train"].mean.shape == (3,)
    x, y = s["test"].get(torch.tensor([0, 1]))
    assert x.shape == (1024, 2, 3)


def test_channel_stats_hand_checked():
    seq = torch.tensor([[[0, 255], [255, 255]]], dtype=torch.uint8)  # (1, 2, 2)
    mean, std = channel_stats(seq)
    assert mean.tolist() == pytest.approx([0.5, 1.0]) and std.tolist() == pytest.approx([0.5, 0])


def _toy(n=10):
    seq = torch.arange(n, dtype=torch.uint8).view(n, 1, 1).expand(n, 3, 1).contiguous()
    return SequentialImages(seq, torch.arange(n) % 10, torch.zeros(1), torch.ones(1) / 255)


def test_batch_iterator_epoch_covers_each_once():
    it = BatchIterator(_toy(10), 3, torch.Generator().manual_seed(0))
    batches = list(it)
    assert [tuple(x.shape) for x, _ in batches] == [(3, 3, 1)] * 3 + [(3, 1, 1)]
    seen = torch.cat([y for _, y in batches])
    assert sorted(seen.tolist()) == list(range(10)) and it.epoch == 1
    assert torch.allclose(batches[0][0][0, :, 0], batches[0][1].float())  # x holds the index
    second = torch.cat([y for _, y in it])
    assert not torch.equal(seen, second) and it.epoch == 2  # a new order per epoch


def test_batch_iterator_same_seed_same_batches():
    a = [y for _, y in BatchIterator(_toy(), 4, torch.Generator().manual_seed(5))]
    b = [y for _, y in BatchIterator(_toy(), 4, torch.Generator().manual_seed(5))]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("stop_after", [0, 2, 4, 6])
def test_batch_iterator_resume(stop_after):
    ref = BatchIterator(_toy(10), 4, torch.Generator().manual_seed(3), drop_last=False)
    want = [y for _ in range(3) for _, y in ref]  # 3 epochs of 3 batches
    run = BatchIterator(_toy(10), 4, torch.Generator().manual_seed(3))
    got = []
    gen = iter(run)
    for _ in range(stop_after):
        try:
            got.append(next(gen)[1])
        except StopIteration:
            gen = iter(run)
            got.append(next(gen)[1])
    state = run.state_dict()
    resumed = BatchIterator(_toy(10), 4, torch.Generator().manual_seed(999))  # other seed
    resumed.load_state_dict(state)
    while len(got) < len(want):
        got.extend(y for _, y in resumed)
    assert all(torch.equal(u, v) for u, v in zip(got, want))


def test_batch_iterator_no_shuffle_drop_last():
    it = BatchIterator(_toy(10), 4, shuffle=False, drop_last=True)
    assert len(it) == 2 and [y.tolist() for _, y in it] == [[0, 1, 2, 3], [4, 5, 6, 7]]
