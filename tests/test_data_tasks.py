"""Data-backed tasks (SPEC §6, §10) on small fixtures in the real formats: every task trains
through the CLI, the LM carries its state window to window and resumes exactly, the embedding
learns with both engines, an untrained model scores about log2(vocab) bits per character, and a
data root without the files gives the data layer's message."""
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from _data_fixtures import idx_arrays, ptb_spec, write_cifar, write_idx_dataset, write_text8
from sab.cli import main
from sab.data import REGISTRY, ptb_words_to_chars
from sab.engines import forward_backward
from sab.tasks import TASKS, Chunk, WindowStream
from sab.trainer import ModelConfig, RunConfig, TrainConfig, Trainer, build_model

WORDS = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran", "<unk>", "N", "'s", "co."]


def _ptb_words(lines: int, seed: int) -> str:
    rng = np.random.default_rng(seed)
    return "".join(" " + " ".join(rng.choice(WORDS, size=rng.integers(3, 9))) + " \n"
                   for _ in range(lines))


@pytest.fixture(scope="module")
def _root(tmp_path_factory):
    """A data root holding every dataset the tasks read, as fixtures, and their registry."""
    root = tmp_path_factory.mktemp("sab_data")
    texts = {s: ptb_words_to_chars(_ptb_words(n, i)).encode()
             for i, (s, n) in enumerate((("train", 120), ("valid", 30), ("test", 30)))}
    (root / "ptb_char").mkdir()
    for s, data in texts.items():
        (root / "ptb_char" / f"ptb.char.{s}.txt").write_bytes(data)
    specs = {"ptb_char": ptb_spec("ptb_char", texts), "text8": write_text8(root, "text8")[0],
             "cifar10": write_cifar(root, "cifar10")[0]}
    for name in ("mnist", "fashion_mnist", "mnist5k"):
        specs[name] = write_idx_dataset(root, name, arrays=idx_arrays(24, 8))[0]
    return root, specs


@pytest.fixture
def root(_root, monkeypatch):
    path, specs = _root
    for name, spec in specs.items():  # the fixtures' sizes and checksums replace the real ones
        monkeypatch.setitem(REGISTRY, name, spec)
    return path


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def lm_config(root, steps=6, model="sab", engine="reference", batch_size=4, **model_kw):
    model_kw = {"hidden": 12, "embed": 6, "k_trunc": 3, "k_top": 2, "k_att": 2,
                "max_memories": 7, **model_kw}
    return RunConfig("ptb", {"data_dir": str(root), "seq_len": 16, "eval_size": 300},
                     ModelConfig(name=model, **model_kw),
                     TrainConfig(steps=steps, batch_size=batch_size, eval_every=3, ckpt_every=3,
                                 engine=engine, lr=3e-3))


# -- every task through the CLI ------------------------------------------------------------------

@pytest.mark.parametrize("task,extra", [
    ("ptb", ["--engine", "sparse", "--max-memories", "4"]), ("text8", []),
    ("mnist", ["--valid-size", "4"]), ("pmnist", ["--valid-size", "4", "--engine", "sparse"]),
    ("fmnist", ["--valid-size", "4"]), ("pfmnist", ["--valid-size", "4", "--model", "lstm"]),
    ("cifar10", ["--valid-size", "4"]),
    ("mnist", ["--dataset", "mnist5k", "--valid-size", "4", "--model", "tbptt"]),
])
def test_dry_run_of_every_data_task(root, tmp_path, capsys, task, extra):
    code = main(["train", "--task", task, "--dry-run", "--data-dir", str(root), "--out",
                 str(tmp_path / "run"), *extra])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 2 and math.isfinite(last["train_loss"])
    metric = f"eval_{TASKS[task].main_metric}"
    assert math.isfinite(last[metric])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["task"]["name"] == task and config["task"]["data_dir"] == str(root)


def test_eval_and_plot_of_a_data_run(root, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--task", "ptb", "--dry-run", "--data-dir", str(root), "--out",
                 str(run)]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "test", "--eval-size", "100"]) == 0
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["split"] == "test" and row["eval_size"] == 100 and math.isfinite(row["bpc"])
    assert "eval_block" not in row  # a fixed text, not a drawn set
    assert main(["plot", "--run", str(run)]) == 0
    assert (run / "curves.png").exists() and (run / "attention.png").exists()
    ckpt = torch.load(run / "ckpt.pt", weights_only=False)
    assert "embedding.weight" in ckpt["model"]  # the embedding is saved with the model


def test_missing_data_gives_the_data_layers_message(tmp_path, capsys):
    code = main(["train", "--task", "ptb", "--dry-run", "--data-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "sab: error: dataset ptb_char: missing" in err
    assert str(tmp_path / "none" / "ptb_char" / "ptb.char.train.txt") in err
    assert "sab data prepare ptb_char" in err


@pytest.mark.parametrize("argv,message", [
    (["--task", "ptb", "--dataset", "mnist"], "reads one of the datasets"),
    (["--task", "fmnist", "--dataset", "ptb_char"], "reads one of the datasets"),
    (["--task", "ptb", "--valid-size", "4"], "has no option valid_size"),
])
def test_bad_data_task_options(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["train", *argv, "--dry-run", "--out", str(tmp_path / "run")])
    assert e.value.code == 2 and message in capsys.readouterr().err


# -- language modelling: state carried, resumed, embedded ------------------------------------------

def test_windows_cover_the_columns_and_reset_once_per_epoch(root):
    task = TASKS["ptb"](TASKS["ptb"].Config(data_dir=str(root), seq_len=16))
    stream = task.train_stream(4, seed=0)
    n_rows = task.corpus.train.numel() // 4
    chunks = [next(stream) for _ in range(-(-(n_rows - 1) // 16) + 1)]
    assert [c.reset for c in chunks] == [True] + [False] * (len(chunks) - 2) + [True]
    xs = torch.cat([c.x for c in chunks[:-1]])  # (N - 1, 4): every row read once, in order
    ys = torch.cat([c.y for c in chunks[:-1]])
    columns = task.corpus.train[:n_rows * 4].view(4, n_rows).t()  # (N, 4)
    assert torch.equal(xs, columns[:-1]) and torch.equal(ys, columns[1:])
    halves = [WindowStream(task.corpus.train, 4, 16, rank, 2) for rank in (0, 1)]
    whole = task.train_stream(4, seed=0)
    for _ in range(3):  # data-parallel: the ranks' columns side by side are the whole batch
        assert torch.equal(torch.cat([next(h).x for h in halves], 1), next(whole).x)


def test_window_by_window_forward_equals_one_long_forward(root):
    task = TASKS["ptb"](TASKS["ptb"].Config(data_dir=str(root), seq_len=7))
    config = lm_config(root, max_memories=5)
    torch.manual_seed(0)
    model = build_model(config.resolved(), task).double().eval()
    stream = task.train_stream(3, seed=0)
    chunks = [next(stream) for _ in range(4)]  # 28 steps: memories evicted on the way
    with torch.no_grad():
        whole, _, rec = model(torch.cat([c.x for c in chunks]), None, return_attention=True)
        state, parts, summaries = None, [], []
        for c in chunks:
            out, state, r = model(c.x, state, return_attention=True)
            parts.append(out)
            summaries.append(r[-1].summary)
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.cat(summaries), rec[-1].summary, rtol=0, atol=1e-12)
    assert len(state.memory[0]) == 5 and state.step == 28


@pytest.mark.parametrize("engine", ["reference", "sparse"])
def test_embedding_learns_with_both_engines(root, engine):
    task = TASKS["ptb"](TASKS["ptb"].Config(data_dir=str(root), seq_len=12))
    torch.manual_seed(0)
    model = build_model(lm_config(root).resolved(), task).double()
    chunk = next(task.train_stream(3, seed=0))
    forward_backward(model.rnn, model.encode(chunk.x), task.loss_fn(chunk, model.readout),
                     engine=engine)
    grad = model.embedding.weight.grad
    used = torch.zeros(len(task.vocab), dtype=torch.bool)
    used[chunk.x.unique()] = True
    assert grad[used].abs().sum(1).gt(0).all() and grad[~used].eq(0).all()
    if engine == "sparse":  # the same gradients as plain autograd
        torch.manual_seed(0)
        ref = build_model(lm_config(root).resolved(), task).double()
        forward_backward(ref.rnn, ref.encode(chunk.x), task.loss_fn(chunk, ref.readout))
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, msg=name)


def test_trainer_carries_the_detached_state_between_windows(root):
    trainer = Trainer(lm_config(root, steps=5))
    trainer.run()
    state = trainer.state
    assert state.step == 5 * 16 and len(state.memory[0]) == 7  # max_memories bounds it
    assert not state.h.requires_grad and state.memory[0].token is None
    assert trainer.stream.state_dict() == {"row": 5 * 16, "epoch": 0}


@pytest.mark.parametrize("engine", ["reference", "sparse"])
def test_lm_resume_is_exact(root, tmp_path, engine):
    """Stop after 3 steps, resume to 10 (past the end of the training split: a new epoch):
    the same weights, carried state, data position and metrics as 10 steps in one go."""
    config = lambda steps: lm_config(root, steps=steps, engine=engine, batch_size=48)
    straight = Trainer(config(10), tmp_path / "a")
    straight.run()
    Trainer(config(3), tmp_path / "b").run()
    resumed = Trainer(config(10), tmp_path / "b")
    resumed.run()
    assert resumed.stream.state_dict() == straight.stream.state_dict()
    assert straight.stream.epoch >= 1  # the split was used up, the state dropped
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert torch.equal(straight.state.h, resumed.state.h)
    assert torch.equal(straight.state.memory[0].values, resumed.state.memory[0].values)
    drop = lambda line: {k: v for k, v in line.items() if k != "time"}
    a = [drop(json.loads(x)) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [drop(json.loads(x)) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert a == b


def test_reset_memory_carries_h_and_c_only(root):
    trainer = Trainer(lm_config(root, steps=2))
    trainer.task.config.reset_memory = True
    trainer.run()
    assert trainer.state.memory is None and trainer.state.step == 32


@pytest.mark.parametrize("model", ["lstm", "sab"])
def test_carried_state_benchmark(root, tmp_path, monkeypatch, model):
    """benchmarks/carried_state.py: its "carried" loss is the loss the next training step
    computes, and where the weights did not move (lr 1e-12) the state the frozen weights
    produce from the epoch's start is the carried one (no gap, whichever part is swapped)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import carried_state
    for lr, out_dir in ((3e-3, tmp_path / "moved"), (1e-12, tmp_path / "still")):
        config = lm_config(root, steps=5, model=model)
        config.train.lr = lr
        Trainer(config, out_dir).run()
        out = carried_state.main(["--run", str(out_dir), "--windows", "3"])
        assert out["step"] == 5 and out["row"] == 5 * 16 and out["own_from_row"] == 0
        assert [w["row"] for w in out["windows"]] == [80, 96, 112]
        nxt = Trainer(config, None)
        nxt.load_checkpoint(torch.load(out_dir / "ckpt.pt", weights_only=False))
        assert out["windows"][0]["carried"] == pytest.approx(nxt.train_step()["loss"], rel=1e-6)
        assert bool(out["swaps"]) == (model == "sab")
    for w in out["windows"]:  # lr 1e-12
        assert w["own"] == pytest.approx(w["carried"], abs=1e-5) and w["mean_abs_dh"] < 1e-5
    for loss in out["swaps"].values():
        assert loss == pytest.approx(out["windows"][0]["carried"], abs=1e-5)
    # --threads is the benchmark's: the run's own threads (1) do not override it
    before = torch.get_num_threads()
    try:
        carried_state.main(["--run", str(out_dir), "--windows", "1", "--threads", "2"])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("bench,refusal,bad,message", [
    ("carried_state", "does not carry its state", ["--threads", "0"],
     "argument --threads: expected an integer >= 1, got 0"),
    ("eval_windows", "not read as a text", ["--every", "0"],
     "--every must be >= 1 characters, got 0")])
def test_text_benchmarks_refuse_a_copying_run_and_bad_arguments(bench, refusal, bad, message,
                                                               tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    module = importlib.import_module(f"benchmarks.{bench}")
    config = RunConfig("copy", {"T": 3, "eval_size": 8}, ModelConfig(name="lstm", hidden=8),
                       TrainConfig(steps=2, batch_size=4, eval_every=2, ckpt_every=2))
    Trainer(config, tmp_path).run()
    with pytest.raises(SystemExit, match=refusal):
        module.main(["--run", str(tmp_path)])
    with pytest.raises(SystemExit):
        module.main(["--run", str(tmp_path), *bad])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("model", ["lstm", "sab"])
def test_untrained_bpc_is_about_log2_vocab(root, model):
    """Near-uniform predictions at initialisation.  SAB is scored on a short text: along a long
    stream its memories' norms grow (see CharLMTask), and so do its logits."""
    task = TASKS["ptb"](TASKS["ptb"].Config(data_dir=str(root), eval_split="test",
                                            eval_size=200))
    torch.manual_seed(0)
    model = build_model(lm_config(root, model=model, hidden=16, embed=8).resolved(),
                        task).eval()
    metrics = task.evaluate(model, chunk_len=7)
    assert math.isfinite(metrics["bpc"])
    assert abs(metrics["bpc"] - math.log2(len(task.vocab))) < 0.1
    # state carried: the window length does not change the result
    assert task.evaluate(model, chunk_len=13)["bpc"] == pytest.approx(metrics["bpc"], abs=1e-5)


# -- sequential images ---------------------------------------------------------------------------

def test_image_task_shapes_permutation_and_last_step_loss(root):
    plain = TASKS["mnist"](TASKS["mnist"].Config(data_dir=str(root), valid_size=4))
    perm = TASKS["pmnist"](TASKS["pmnist"].Config(data_dir=str(root), valid_size=4))
    cifar = TASKS["cifar10"](TASKS["cifar10"].Config(data_dir=str(root), valid_size=2))
    assert (plain.T, plain.input_size, plain.output_size) == (784, 1, 10)
    assert (cifar.T, cifar.input_size) == (1024, 3)
    assert len(plain.splits["train"]) == 20 and len(plain.splits["valid"]) == 4
    x, y, reset = next(plain.train_stream(4, seed=0))
    xp, yp, _ = next(perm.train_stream(4, seed=0))
    p = perm.splits["train"].permutation  # the recorded seed's permutation
    assert reset and x.shape == (784, 4, 1) and torch.equal(y, yp) and torch.equal(xp, x[p])
    assert perm.config.perm_seed == 1234
    loss = plain.loss_fn(Chunk(x, y, True), lambda o, s: o)
    assert loss.loss_steps == (783,) and loss(0, 700, None, None) is None


def test_image_stream_resumes_mid_epoch_and_across_epochs(root):
    task = TASKS["fmnist"](TASKS["fmnist"].Config(data_dir=str(root), valid_size=4))
    a = task.train_stream(8, seed=3)  # 20 images: 2 whole batches an epoch
    for _ in range(3):
        next(a)
    b = task.train_stream(8, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        ca, cb = next(a), next(b)
        assert torch.equal(ca.x, cb.x) and torch.equal(ca.y, cb.y)


def test_eval_windows_benchmark_reads_the_split_as_the_task_evaluates_it(root, tmp_path,
                                                                          monkeypatch):
    """benchmarks/eval_windows.py: its two totals are the task's own evaluation with the state
    carried and with reset_memory, and its stretches cover the split, weighting to the total."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    from benchmarks import eval_windows
    from sab.trainer import load_run
    Trainer(lm_config(root, steps=3), tmp_path).run()
    out = eval_windows.main(["--run", str(tmp_path), "--every", "7", "--window", "5"])
    _, task, model, _ = load_run(tmp_path)
    _, reset_task, _, _ = load_run(tmp_path, task_options={"reset_memory": True})
    # windows of 5 against the task's 1,000: float32 sums in another order
    assert out["carried"]["bpc"] == pytest.approx(task.evaluate(model)["bpc"], rel=1e-6)
    assert out["reset_memory"]["bpc"] == pytest.approx(reset_task.evaluate(model)["bpc"],
                                                       rel=1e-6)
    assert out["carried"]["bpc"] != pytest.approx(out["reset_memory"]["bpc"], rel=1e-4)
    rows = task._eval_columns().shape[0] - 1  # characters scored per column
    for reading in (out["carried"], out["reset_memory"]):
        ends = [s["to_row"] for s in reading["stretches"]]
        assert ends == sorted(ends) and ends[-1] == rows and len(ends) >= 2
        sizes = [b - a for a, b in zip([0] + ends, ends)]
        mean = sum(s["bpc"] * k for s, k in zip(reading["stretches"], sizes)) / rows
        assert mean == pytest.approx(reading["bpc"], rel=1e-9)
