"""Trainer: learning, checkpoints, resume after SIGKILL, non-finite loss."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sab.trainer import (ConfigError, CKPT, METRICS, ModelConfig, NonFiniteLoss, RunConfig, TrainConfig,
                         Trainer)

ROOT = Path(__file__).resolve().parents[1]


def tiny(model="lstm", steps=10, **train):
    train = {"steps": steps, "batch_size": 16, "eval_every": 5, "ckpt_every": 5,
             "eval_batch": 32, "lr": 3e-3, **train}
    return RunConfig("copy", {"T": 3, "eval_size": 32},
                     ModelConfig(name=model, hidden=16, k_trunc=3, k_top=2, k_att=2),
                     TrainConfig(**train))


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_trainer_reduces_loss_on_tiny_copying():
    trainer = Trainer(tiny("sab", steps=150, eval_every=50, clip=0.0))
    trainer.run()
    first, last = trainer.history[0], trainer.history[-1]
    assert first["step"] == 0 and last["step"] == 150
    assert last["eval_ce"] < 0.6 * first["eval_ce"]
    assert all(torch.isfinite(torch.tensor(m["grad_norm"])) for m in trainer.history[1:])
    assert {"h_norm", "c_norm", "grad_norm", "grad_norm_max", "train_loss", "time"} <= set(last)


def test_checkpoint_round_trip_in_process(tmp_path):
    """Stopping after 5 steps and resuming gives the same parameters as 10 steps at once."""
    Trainer(tiny("sab", steps=10), tmp_path / "a").run()
    Trainer(tiny("sab", steps=5), tmp_path / "b").run()
    Trainer(tiny("sab", steps=10), tmp_path / "b").run()  # resumes at step 5
    a = torch.load(tmp_path / "a" / CKPT, weights_only=False)
    b = torch.load(tmp_path / "b" / CKPT, weights_only=False)
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert not (tmp_path / "a" / (CKPT + ".tmp")).exists()


def _metrics(run):
    lines = [json.loads(x) for x in (run / METRICS).read_text().splitlines()]
    for line in lines:
        line.pop("time")  # wall time differs between runs
    return lines


CMD = ["--task", "copy", "--model", "sab", "--T", "6", "--hidden", "12", "--k-trunc", "3",
       "--k-top", "2", "--k-att", "2", "--batch-size", "8", "--steps", "150", "--eval-every",
       "10", "--ckpt-every", "10", "--eval-size", "16", "--threads", "1", "--seed", "5",
       "--lr-schedule", "cosine"]  # the schedule is a function of the step: resumes exactly


def _sab(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "sab", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_resume_after_sigkill_equals_uninterrupted(tmp_path):
    """A run killed with SIGKILL after its first checkpoints and restarted with the same command
    ends bitwise equal (parameters, optimizer, metrics) to a run never interrupted."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _sab(CMD + ["--out", str(killed)])
    ckpt = killed / CKPT
    deadline = time.time() + 120
    while time.time() < deadline:  # wait for a checkpoint past step 20, then kill mid-run
        if ckpt.exists() and (killed / METRICS).exists() and \
                len((killed / METRICS).read_text().splitlines()) >= 4:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    step_at_kill = torch.load(ckpt, weights_only=False)["step"]
    assert 0 < step_at_kill < 150
    resumed = _sab(CMD + ["--out", str(killed)])
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    ref = _sab(CMD + ["--out", str(whole)])
    out2, err2 = ref.communicate(timeout=300)
    assert ref.returncode == 0, err2
    a = torch.load(ckpt, weights_only=False)
    b = torch.load(whole / CKPT, weights_only=False)
    assert a["step"] == b["step"] == 150
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert _metrics(killed) == _metrics(whole)
    assert len((killed / "cmd.txt").read_text().splitlines()) == 2  # both invocations echoed


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_after_the_step_with_a_checkpoint(tmp_path, sig):
    """SIGINT or SIGTERM: the run stops after the current step, writes its checkpoint there and
    exits 0; restarted, it finishes.  SIGINT is sent to a process that inherited it ignored, as a
    job started in the background by a non-interactive shell does."""
    out = tmp_path / "run"
    proc = _sab(CMD + ["--out", str(out)],
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    deadline = time.time() + 120
    while time.time() < deadline and not (out / CKPT).exists():
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "stopping after this step" in err
    step = torch.load(out / CKPT, weights_only=False)["step"]
    assert 0 < step < 150
    assert all(m["step"] <= step for m in _metrics(out))
    resumed = _sab(CMD + ["--out", str(out)])
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    steps = [m["step"] for m in _metrics(out)]
    assert steps == sorted(set(steps)) and steps[-1] == 150


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(tiny("sab", steps=20), tmp_path, debug_nan_at_step=8)
    with pytest.raises(NonFiniteLoss, match="at step 8") as info:
        trainer.run()
    assert info.value.step == 8
    ckpt = torch.load(tmp_path / CKPT, weights_only=False)
    assert ckpt["step"] == 5  # the last checkpoint before the failure, untouched
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    # resuming (without the poison) continues from step 5 to the end
    Trainer(tiny("sab", steps=20), tmp_path).run()
    assert torch.load(tmp_path / CKPT, weights_only=False)["step"] == 20


def test_resume_refuses_a_different_config(tmp_path):
    from sab.trainer import ConfigError
    Trainer(tiny("lstm", steps=5), tmp_path).run()
    with pytest.raises(ConfigError, match="model.name"):
        Trainer(tiny("tbptt", steps=10), tmp_path).run()


def test_a_run_directory_without_its_checkpoint_is_refused_not_erased(tmp_path):
    """Metrics past the first checkpoint and no ckpt.pt (deleted, or a finished run's checkpoint
    left out of git): resuming is impossible and starting over would erase the metrics."""
    Trainer(tiny(steps=10), tmp_path / "run").run()
    (tmp_path / "run" / CKPT).unlink()
    recorded = (tmp_path / "run" / METRICS).read_text()
    with pytest.raises(ConfigError, match=r"metrics up to step 10 but no checkpoint ckpt\.pt"):
        Trainer(tiny(steps=20), tmp_path / "run")
    assert (tmp_path / "run" / METRICS).read_text() == recorded
    # killed before its first checkpoint (metrics of steps 0 and 5, ckpt_every 5): starts over
    lines = recorded.splitlines(keepends=True)[:2]
    (tmp_path / "run" / METRICS).write_text("".join(lines) + '{"step": 7, "ti')  # cut short
    trainer = Trainer(tiny(steps=10), tmp_path / "run")
    trainer.run()
    assert [m["step"] for m in trainer.history] == [0, 5, 10]


def test_adding_task_trains():
    cfg = RunConfig("adding", {"T": 6, "eval_size": 64},
                    ModelConfig(name="sab", hidden=8, k_trunc=2, k_top=1, k_att=1),
                    TrainConfig(steps=4, batch_size=8, eval_every=2, ckpt_every=2))
    trainer = Trainer(cfg)
    last = trainer.run()
    assert last["step"] == 4 and "eval_mse" in last


@pytest.mark.slow
def test_sab_training_is_stable_over_seeds():
    """Several seeds of SAB on copying stay finite with bounded loss (benchmarks/stability.py
    runs the SPEC's longer version: T=100, 4000 steps)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("stability", ROOT / "benchmarks" /
                                                  "stability.py")
    stability = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stability)
    assert stability.main(["--seeds", "0", "1", "2", "--steps", "600", "--T", "20",
                           "--hidden", "32", "--eval-every", "100"]) == 0


def test_cosine_schedule_sets_each_updates_learning_rate():
    import math
    cfg = tiny("lstm", steps=8)
    cfg.train.lr, cfg.train.lr_schedule = 0.01, "cosine"
    trainer = Trainer(cfg)
    seen = []
    for _ in range(8):
        trainer.train_step()
        seen.append(trainer.optimizer.param_groups[0]["lr"])
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(8)]
    assert seen == pytest.approx(expected, rel=1e-12)
    assert seen[0] == 0.01 and seen[-1] < 0.01 * 0.04


def test_unknown_lr_schedule_is_a_config_error():
    cfg = tiny("lstm")
    cfg.train.lr_schedule = "linear"
    with pytest.raises(ConfigError, match="lr_schedule must be one of constant, cosine"):
        cfg.resolved()


def test_delta_grad_without_blocked_scores_is_a_config_error():
    cfg = tiny("sab")
    cfg.model.delta_grad = True
    with pytest.raises(ConfigError, match="delta_grad needs block_score_grad"):
        cfg.resolved()
    cfg.model.block_score_grad = True
    assert cfg.resolved().model.delta_grad is True


def test_score_grad_benchmark_changes_only_the_scorers_gradient(tmp_path, monkeypatch):
    """benchmarks/score_grad.py on a small trained SAB run: δ's rule leaves the loss and the
    gradient of everything but the scorer unchanged (with blocked scores the threshold reaches
    nothing else) and changes the gradient of the scorer's ``v``."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import score_grad
    cfg = tiny("sab", steps=10)
    cfg.model.block_score_grad = True
    Trainer(cfg, tmp_path).run()
    out = score_grad.main(["--run", str(tmp_path), "--batches", "2"])
    const = [r for r in out["rows"] if not r["delta_grad"]]
    moving = [r for r in out["rows"] if r["delta_grad"]]
    assert len(const) == len(moving) == 2 and out["step"] == 10
    for a, b in zip(const, moving):
        assert a["loss"] == b["loss"]
        assert a["LSTM, head, embedding"] == pytest.approx(b["LSTM, head, embedding"], rel=1e-6)
        assert a["scorer v"] != b["scorer v"]


def test_score_grad_benchmark_rejects_a_run_without_blocked_scores(tmp_path, monkeypatch):
    """Refused from config.json alone: no data or checkpoint is loaded first (there is none)."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import score_grad
    (tmp_path / "config.json").write_text(json.dumps(tiny("lstm", steps=2).to_dict()))
    with pytest.raises(SystemExit, match="needs a SAB run trained with block_score_grad"):
        score_grad.main(["--run", str(tmp_path)])


def test_step_time_benchmark_reports_ratios_within_rounds(tmp_path):
    """benchmarks/step_time.py on tiny problems: every method timed in every round, the ratio to
    the LSTM the median of the rounds' ratios (the LSTM's own is exactly 1)."""
    from benchmarks import step_time

    res = step_time.main(["--T", "6", "--methods", "lstm", "sab-ref", "--repeats", "3",
                          "--json", str(tmp_path / "t.json")])
    assert set(res["times_s"]) == {"lstm@6", "sab-ref@6"}
    assert all(t > 0 for t in res["times_s"].values())
    assert res["median_ratio"]["lstm/lstm@6"] == 1.0
    assert res["median_ratio"]["sab-ref/lstm@6"] > 0
    assert json.loads((tmp_path / "t.json").read_text())["median_ratio"] == res["median_ratio"]


def test_steps_visited_counts_trained_runs(tmp_path, monkeypatch, capsys):
    """benchmarks/steps_visited.py --runs on small trained adding and copying runs: without
    attention (k_top = 0) a loss at the last step visits exactly the last block (k_trunc = 3: the
    steps from the last multiple of 3); with attention at least that and at most every step; the
    steps holding 99.9% of the credit are among them; the credit_tol approximation visits no more
    than the exact rule, with a finite gradient error."""
    monkeypatch.syspath_prepend(str(ROOT))
    from benchmarks import steps_visited

    runs = {}
    for task, k_top in (("adding", 0), ("adding", 2), ("copy", 2)):
        cfg = tiny("sab", steps=5)
        cfg.task, cfg.task_options = task, {"T": 6, "eval_size": 32}
        cfg.model.k_top = k_top
        runs[(task, k_top)] = tmp_path / f"{task}{k_top}"
        Trainer(cfg, runs[(task, k_top)]).run()
    Ts = [8, 13]
    out = steps_visited.main(["--T", *map(str, Ts), "--seqs", "2", "--train-steps", "0",
                              "--runs", *map(str, runs.values()), "--credit-tol", "0.2"])["runs"]
    # the reference engine's non-zero input gradients are exactly the visited steps
    assert "warning" not in capsys.readouterr().out
    g = torch.tensor([0.0, 5.0, 3.0, 2.0])
    assert steps_visited.credit_steps(g) == 3 and steps_visited.credit_steps(g, 0.5) == 1
    for (task, k_top), run in runs.items():
        for T in Ts:
            got = out[str(run)][T]
            L = T + 20 if task == "copy" else T
            last_block = L - (L - 1) // 3 * 3
            assert got["steps"] == L and math.isfinite(got["loss"])
            assert 1 <= got["held"] <= got["visited"]  # 99.9% of the credit: within the visited
            cut = got["tol"][0.2]  # the approximation: never more steps, a finite error
            assert 1 <= cut["visited"] <= got["visited"]
            assert 0 <= cut["grad_error"] <= cut["grad_error_max"] < float("inf")
            if k_top == 0:
                assert got["visited"] == last_block
            else:
                assert last_block <= got["visited"] <= L


@pytest.mark.slow
def test_dispatch_benchmark_compares_bit_identical_versions(tmp_path):
    """benchmarks/dispatch.py (sab.native, compiled about a minute the first time): the C++
    version of the LSTM pointwise backward returns exactly what the Python one does."""
    from benchmarks import dispatch

    res = dispatch.main(["--batch", "4", "--hidden", "8", "--calls", "20", "--rounds", "1",
                         "--json", str(tmp_path / "d.json")])
    assert res["bit_identical"] and res["python_us"] > 0 and res["cpp_us"] > 0
    assert json.loads((tmp_path / "d.json").read_text())["n_ops"] == dispatch.N_OPS
    # the per-operation figures divide by the operations the Python version really dispatches
    from torch.utils._python_dispatch import TorchDispatchMode
    from sab.cell import pointwise_backward

    calls = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func)
            return func(*args, **(kwargs or {}))

    x = [torch.rand(4, 8) for _ in range(4)]
    act, dgates = torch.rand(4, 32), torch.empty(4, 32)
    with Count():
        pointwise_backward(x[0], x[1], act, x[2], x[3], dgates)
    assert len(calls) == dispatch.N_OPS


def test_sparse_engine_runs_log_the_share_backpropagated_and_the_credit_cut(tmp_path):
    """With the sparse engine a run's metrics say which share of the cell steps the backward
    visited; with a credit tolerance, how many memories it cut off per step (adding: a loss at
    the last step, so the share is below 1; a tolerance can only lower it here)."""
    shares = {}
    for tol in (0.0, 0.5):
        cfg = tiny("sab", steps=6, engine="sparse", credit_tol=tol, eval_every=3)
        cfg.task, cfg.task_options = "adding", {"T": 30, "eval_size": 32}
        Trainer(cfg, tmp_path / str(tol)).run()
        lines = [json.loads(s) for s in (tmp_path / str(tol) / METRICS).read_text().splitlines()]
        lines = [line for line in lines if line["step"] > 0]  # (step 0: the untrained model)
        assert len(lines) == 2 and all(0 < line["backprop_fraction"] < 1 for line in lines)
        assert ("memories_cut" in lines[-1]) == (tol > 0)
        shares[tol] = lines[0]["backprop_fraction"]  # the same first steps: same parameters
    assert shares[0.5] <= shares[0.0]


def test_credit_tol_is_a_config_error_outside_the_sparse_engine():
    cfg = tiny("sab", credit_tol=0.1)
    with pytest.raises(ConfigError, match="credit_tol=0.1 needs engine 'sparse'"):
        cfg.resolved()
    cfg.train.engine, cfg.train.credit_tol = "sparse", 1.5
    with pytest.raises(ConfigError, match=r"credit_tol must be a number in \[0, 1\)"):
        cfg.resolved()
