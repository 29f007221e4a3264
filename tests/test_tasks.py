"""Tasks (SPEC §6): exact data formats, reproducibility, the no-memory baselines, the loss callback."""
import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings, strategies as st

import sab
from sab import tasks
from sab.heads import SequenceModel
from sab.tasks import CopyingTask, adding_batch, build_task, copying_batch, encode_copying


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("T", [1, 5, 100])
def test_copying_format(T):
    x, y = copying_batch(T, 64, gen())
    assert x.shape == y.shape == (T + 20, 64) and x.dtype == y.dtype == torch.long
    digits = x[:10]
    assert ((digits >= 1) & (digits <= 8)).all()
    assert set(digits.unique().tolist()) == set(range(1, 9))  # all eight digits occur
    assert (x[10:T + 9] == 0).all()  # T-1 blanks
    assert (x[T + 9] == 9).all()  # the marker
    assert (x[T + 10:] == 0).all()  # 10 blanks
    assert (y[:T + 10] == 0).all()  # T+10 blank targets
    assert torch.equal(y[T + 10:], digits)  # then the digits, in order


def test_copying_encodings():
    x, _ = copying_batch(3, 2, gen())
    scalar = encode_copying(x, one_hot=False)
    assert scalar.shape == (23, 2, 1) and torch.equal(scalar[..., 0], x.float())  # raw value
    oh = encode_copying(x, one_hot=True)
    assert oh.shape == (23, 2, 10) and torch.equal(oh.argmax(-1), x)
    assert torch.equal(oh.sum(-1), torch.ones(23, 2))
    assert build_task("copy", one_hot=True).input_size == 10
    assert build_task("copy").input_size == 1


def test_generators_are_reproducible_and_independent_of_the_global_rng():
    torch.manual_seed(0)
    a = copying_batch(10, 4, gen(7))
    torch.manual_seed(1)
    torch.rand(100)  # consume the global RNG: must not matter
    b = copying_batch(10, 4, gen(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = copying_batch(10, 4, gen(8))
    assert not torch.equal(a[0], c[0])
    xa, ya = adding_batch(10, 4, gen(3))
    xb, yb = adding_batch(10, 4, gen(3))
    assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("T", [2, 7, 200])
def test_adding_format(T):
    x, y = adding_batch(T, 256, gen())
    assert x.shape == (T, 256, 2) and y.shape == (256,)
    values, marker = x[..., 0], x[..., 1]
    assert ((values >= 0) & (values < 1)).all()
    assert set(marker.unique().tolist()) <= {0.0, 1.0}
    half = T // 2
    assert (marker[:half].sum(0) == 1).all() and (marker[half:].sum(0) == 1).all()
    assert torch.allclose((values * marker).sum(0), y)
    _, y_mean = adding_batch(T, 256, gen(), target="mean")
    assert torch.allclose(y_mean, y / 2)


def test_no_memory_baseline_copying():
    """The best model without memory — blanks certain, a uniform guess among 1..8 for each recalled
    digit — scores CE = 10·ln8/(T+20), CE10 = ln 8 and accuracy 1/8 (SPEC §6)."""
    T, B = 30, 4096
    task = build_task("copy", T=T)
    x, y, _ = task.sample(B, gen())
    logits = torch.full((T + 20, B, 10), -1e9)
    logits[:T + 10, :, 0] = 0.0  # a blank, certainly
    logits[T + 10:, :, 1:9] = 0.0  # uniform over the eight digits
    m = CopyingTask.metrics_from_logits(logits, y)
    assert m["ce"] == pytest.approx(10 * math.log(8) / (T + 20), rel=1e-6)
    assert m["ce"] == pytest.approx(CopyingTask.no_memory_ce(T), rel=1e-6)
    assert m["ce10"] == pytest.approx(math.log(8), rel=1e-6)
    assert m["acc"] == pytest.approx(1 / 8, abs=0.01)  # argmax guesses one digit: right 1 in 8
    # the loss callback gives the same CE over all positions
    loss = task.loss_fn(task.sample(B, gen())._replace(y=y), lambda o, s: logits)
    assert loss(0, T + 20, None, None).item() == pytest.approx(m["ce"], rel=1e-6)


def test_no_memory_baseline_adding():
    task = build_task("adding", T=50, eval_size=4096)
    x, y, _ = task.sample(20000, gen())
    assert ((1.0 - y) ** 2).mean().item() == pytest.approx(1 / 6, abs=0.005)
    mean_task = build_task("adding", T=50, target="mean")
    _, ym, _ = mean_task.sample(20000, gen())
    assert ((0.5 - ym) ** 2).mean().item() == pytest.approx(1 / 24, abs=0.002)


def _model(task, name="sab", hidden=6):
    torch.manual_seed(0)
    kw = {"sab": dict(k_trunc=3, k_top=2, k_att=2), "tbptt": dict(k_trunc=3)}.get(name, {})
    return SequenceModel(sab.build_rnn(name, task.input_size, hidden, **kw), task.output_size)


def test_copy_loss_is_additive_over_blocks():
    task = build_task("copy", T=7)
    chunk = task.sample(3, gen())
    model = _model(task)
    out, _, rec = model(chunk.x, None, return_attention=True)
    loss = task.loss_fn(chunk, model.readout)
    s = rec[-1].summary
    whole = loss(0, 27, out, s)
    parts = sum(loss(a, b, out[a:b], s[a:b]) for a, b in [(0, 5), (5, 12), (12, 27)])
    assert torch.allclose(whole, parts, atol=1e-6)


def test_adding_loss_only_in_the_last_block():
    task = build_task("adding", T=10)
    chunk = task.sample(3, gen())
    model = _model(task)
    out, _, rec = model(chunk.x, None, return_attention=True)
    loss = task.loss_fn(chunk, model.readout)
    s = rec[-1].summary
    assert loss(0, 5, out[:5], s[:5]) is None
    last = loss(5, 10, out[5:], s[5:])
    assert torch.allclose(last, loss(0, 10, out, s))
    pred = model.readout(out[-1:], s[-1:])[0, :, 0]
    assert torch.allclose(last, ((pred - chunk.y) ** 2).mean())


@pytest.mark.parametrize("name", ["sab", "lstm", "tbptt", "selfattn"])
def test_evaluation_in_windows_equals_whole(name):
    """Transfer evaluation at long T runs in windows with the state carried: same metrics."""
    task = build_task("copy", T=15, eval_size=6)
    model = _model(task, name).double().eval()
    task_d = task
    orig = task_d.sample
    task_d.sample = lambda b, g, T=None: (lambda c: c._replace(x=c.x.double()))(orig(b, g, T))
    whole = task_d.evaluate(model, batch_size=4, chunk_len=1000)
    windows = task_d.evaluate(model, batch_size=4, chunk_len=7)
    for k in whole:
        assert whole[k] == pytest.approx(windows[k], rel=1e-9, abs=1e-12)
    longer = task_d.evaluate(model, T=60, batch_size=6, chunk_len=25)
    assert set(longer) == {"acc", "ce10", "ce"}


@pytest.mark.parametrize("chunk_len", [1000, 7, 3])
def test_per_position_metrics_against_the_definition(chunk_len):
    """acc_by_position[i] is the fraction of sequences whose i-th recalled digit is the argmax,
    ce10_by_position[i] the mean cross-entropy there, computed here from whole-sequence logits;
    windows that split the recall change nothing, and the means are acc and ce10."""
    task = build_task("copy", T=15, eval_size=10)
    model = _model(task, "sab").double().eval()
    orig = task.sample
    task.sample = lambda b, g, T=None: (lambda c: c._replace(x=c.x.double()))(orig(b, g, T))
    m = task.evaluate(model, batch_size=4, chunk_len=chunk_len, per_position=True)
    x, y, _ = task.sample(10, task.eval_generator())  # the set: one block of 10 < EVAL_BLOCK
    with torch.no_grad():
        out, _, rec = model(x, None, return_attention=True)
        logits = model.readout(out, rec[-1].summary)[-10:]  # (10, B, 10)
    want_acc = (logits.argmax(-1) == y[-10:]).double().mean(1)
    want_ce = torch.nn.functional.cross_entropy(logits.permute(1, 2, 0), y[-10:].T,
                                                reduction="none").mean(0)
    assert m["acc_by_position"] == pytest.approx(want_acc.tolist(), abs=1e-12)
    assert m["ce10_by_position"] == pytest.approx(want_ce.tolist(), rel=1e-9)
    assert sum(m["acc_by_position"]) / 10 == pytest.approx(m["acc"], abs=1e-12)
    assert sum(m["ce10_by_position"]) / 10 == pytest.approx(m["ce10"], rel=1e-9)
    assert set(task.evaluate(model, batch_size=4)) == {"acc", "ce10", "ce"}  # off by default


def _batch_dim_cat(parts):
    x = torch.cat([p.x for p in parts], 1)
    y = torch.cat([p.y for p in parts], 0 if parts[0].y.dim() == 1 else 1)
    return x, y


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(["copy", "adding"]), size=st.integers(1, 23),
       block=st.integers(1, 9), batch=st.integers(1, 30))
def test_eval_set_is_drawn_in_blocks_whatever_the_batch(name, size, block, batch):
    """The evaluation set is the eval generator's draws of min(EVAL_BLOCK, rest) sequences, in
    order; any batch size hands out exactly those sequences, in batches of min(batch, rest)."""
    task = build_task(name, T=6, eval_size=size)
    g, want, drawn = task.eval_generator(), [], 0
    while drawn < size:
        want.append(task.sample(min(block, size - drawn), g))
        drawn += want[-1].x.shape[1]
    want_x, want_y = _batch_dim_cat(want)
    with mock.patch.object(tasks, "EVAL_BLOCK", block):
        got = list(task.eval_batches(batch))
    assert [c.x.shape[1] for c in got] == [min(batch, size - i) for i in range(0, size, batch)]
    x, y = _batch_dim_cat(got)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)
    assert all(c.reset for c in got)


def test_eval_set_keeps_the_trainers_recorded_draws():
    """With the default block (128, the trainer's eval_batch), batches of 128 are the draws every
    recorded training evaluation made: task.sample(128) four times from the eval generator."""
    task = build_task("copy", T=4, eval_size=512)
    g = task.eval_generator()
    old = [task.sample(128, g) for _ in range(4)]
    for batch in (128, 64, 100, 512):
        x, y = _batch_dim_cat(list(task.eval_batches(batch)))
        assert torch.equal(x, torch.cat([c.x for c in old], 1))
        assert torch.equal(y, torch.cat([c.y for c in old], 1))
    with pytest.raises(ValueError, match="batch_size"):
        next(task.eval_batches(0))


@pytest.mark.parametrize("name", ["copy", "adding"])
def test_evaluation_does_not_depend_on_the_batch(name):
    """The metrics of one model at eval batches that do and do not divide the block, across
    more than one block (eval_size 150 > 128): the same sequences, so the same numbers."""
    task = build_task(name, T=8, eval_size=150)
    model = _model(task, "sab").double().eval()
    orig = task.sample
    task.sample = lambda b, g, T=None: (lambda c: c._replace(x=c.x.double()))(orig(b, g, T))
    ref = task.evaluate(model, batch_size=150)
    for batch in (7, 64, 128):
        got = task.evaluate(model, batch_size=batch)
        assert got == pytest.approx(ref, rel=1e-12)


def test_adding_evaluation_windows():
    task = build_task("adding", T=20, eval_size=5)
    model = _model(task).eval()
    a = task.evaluate(model, chunk_len=1000)["mse"]
    b = task.evaluate(model, chunk_len=6)["mse"]
    assert a == pytest.approx(b, rel=1e-5)


def test_stream_slices_concatenate_to_the_global_batch():
    task = build_task("copy", T=5)
    whole = task.train_stream(8, seed=3)
    parts = [task.train_stream(8, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        c = next(whole)
        p = [next(s) for s in parts]
        assert torch.equal(torch.cat([q.x for q in p], 1), c.x)
        assert torch.equal(torch.cat([q.y for q in p], 1), c.y)
    task = build_task("adding", T=6)
    whole, parts = task.train_stream(4, 1), [task.train_stream(4, 1, r, 2) for r in range(2)]
    c, p = next(whole), [next(s) for s in parts]
    assert torch.equal(torch.cat([q.y for q in p]), c.y)
    with pytest.raises(ValueError, match="divisible"):
        task.train_stream(5, 0, 0, 2)


def test_stream_state_round_trip():
    task = build_task("copy", T=5)
    s = task.train_stream(4, seed=0)
    next(s)
    saved = s.state_dict()
    a = next(s)
    s2 = task.train_stream(4, seed=0)
    s2.load_state_dict(saved)
    assert torch.equal(next(s2).x, a.x)


def test_bad_task_options():
    with pytest.raises(ValueError, match="no option one_hot"):
        build_task("adding", one_hot=True)
    with pytest.raises(ValueError, match="task must be one of"):
        build_task("nope")
    with pytest.raises(ValueError, match="T must be"):
        build_task("copy", T=0)
    with pytest.raises(ValueError, match="sum' or 'mean"):
        build_task("adding", target="max")
