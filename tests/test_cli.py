"""The ``sab`` command line: dry runs of every task × model, config files, errors, eval and plot."""
import json

import pytest
import torch

from sab.cli import main
from sab.models import MODELS
from sab.tasks import TASKS


@pytest.fixture(autouse=True)
def _restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("task", sorted(t for t in TASKS if t in ("adding", "copy")))
@pytest.mark.parametrize("model", sorted(MODELS))  # data tasks: tests/test_data_tasks.py
def test_dry_run_every_task_and_model(tmp_path, task, model, capsys):
    assert main(["train", "--task", task, "--model", model, "--dry-run", "--out",
                 str(tmp_path)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["step"] == 2
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model"]["name"] == model and config["task"]["name"] == task
    assert (tmp_path / "ckpt.pt").exists() and (tmp_path / "cmd.txt").exists()
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3  # steps 0, 1, 2


def test_config_file_round_trip_and_override(tmp_path, capsys):
    a = tmp_path / "a"
    main(["train", "--dry-run", "--model", "tbptt", "--k-trunc", "4", "--out", str(a)])
    b = tmp_path / "b"
    main(["train", "--config", str(a / "config.json"), "--lr", "0.005", "--out", str(b)])
    cb = json.loads((b / "config.json").read_text())
    ca = json.loads((a / "config.json").read_text())
    assert cb["train"]["lr"] == 0.005
    ca["train"]["lr"] = 0.005
    assert ca == cb  # everything else came from the file


def _error(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["train", "--out", "x", "--model", "gru"], "invalid choice: 'gru'"),
    (["train", "--out", "x", "--k-top", "-1"], "expected an integer >= 0"),
    (["train", "--out", "x", "--hidden", "0"], "expected an integer >= 1"),
    (["train", "--out", "x", "--lr", "abc"], "expected a number"),
    (["train", "--out", "x", "--engine", "warp"], "invalid choice: 'warp'"),
    (["train", "--out", "x", "--credit-tol", "1"], "expected a number in [0, 1)"),
    (["train", "--out", "x", "--credit-tol", "0.01"], "credit_tol=0.01 needs engine 'sparse'"),
    (["train", "--out", "x", "--task", "adding", "--one-hot"], "no option one_hot"),
    (["train", "--out", "x", "--task", "copy", "--adding-target", "mean"], "no option target"),
    (["train", "--out", "x", "--batch-size", "64", "--lr", "0"], "lr must be > 0"),
    (["train", "--steps", "3"], "--out"),
    (["eval", "--run", "/nonexistent/run"], "not a run directory"),
])
def test_bad_flags_give_a_clear_error(capsys, argv, message):
    assert message in _error(capsys, argv)


def test_bad_config_files(tmp_path, capsys):
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    assert "not valid JSON" in _error(capsys, ["train", "--config", str(bad_json), "--out", "x"])
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"task": {"name": "copy"}, "model": {"hidn": 3}}))
    err = _error(capsys, ["train", "--config", str(unknown), "--out", "x"])
    assert "'model' has no field hidn" in err
    bad_value = tmp_path / "value.json"
    bad_value.write_text(json.dumps({"task": {"name": "copy"}, "model": {"name": "rnn"}}))
    assert "model must be one of" in _error(capsys, ["train", "--config", str(bad_value),
                                                     "--out", "x"])
    assert "does not exist" in _error(capsys, ["train", "--config", str(tmp_path / "no.json"),
                                               "--out", "x"])


def test_non_finite_loss_exit_code_and_message(tmp_path, capsys):
    code = main(["train", "--dry-run", "--steps", "6", "--ckpt-every", "2", "--out",
                 str(tmp_path), "--debug-nan-at-step", "5"])
    err = capsys.readouterr().err
    assert code == 3
    assert "non-finite training loss (nan) at step 5" in err
    assert "last good checkpoint" in err
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 4


def test_eval_at_other_lengths_and_plot(tmp_path, capsys):
    run = tmp_path / "run"
    main(["train", "--dry-run", "--model", "sab", "--out", str(run)])
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--T", "10", "40", "--chunk-len", "16"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [r["T"] for r in rows] == [10, 40] and all(r["trained_T"] == 10 for r in rows)
    assert len((run / "eval.jsonl").read_text().splitlines()) == 2
    assert main(["plot", "--run", str(run)]) == 0
    for name in ("curves.png", "attention.png"):
        assert (run / name).read_bytes()[:4] == b"\x89PNG"


def test_eval_per_position(tmp_path, capsys):
    """``sab eval --per-position``: the accuracy and cross-entropy at each of the 10 recalled
    digits, whose means are the row's acc and ce10; a task without recalled digits is refused."""
    run = tmp_path / "run"
    main(["train", "--dry-run", "--model", "sab", "--out", str(run)])
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--per-position", "--T", "12"]) == 0
    (row,) = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(row["acc_by_position"]) == len(row["ce10_by_position"]) == 10
    assert sum(row["acc_by_position"]) / 10 == pytest.approx(row["acc"], abs=1e-9)
    assert sum(row["ce10_by_position"]) / 10 == pytest.approx(row["ce10"], rel=1e-6)
    adding = tmp_path / "adding"
    main(["train", "--dry-run", "--task", "adding", "--out", str(adding)])
    capsys.readouterr()
    assert "per_position: only the copying task" in _error(
        capsys, ["eval", "--run", str(adding), "--per-position"])


@pytest.mark.filterwarnings("ignore:No artists with labels")  # (the mocked plot draws none)
def test_plot_compares_runs(tmp_path, capsys):
    """``sab plot`` with several --run draws one metric of each (the task's main one unless
    --metric says) into --out; bad uses are usage errors."""
    from unittest import mock

    runs = [tmp_path / "a", tmp_path / "b"]
    for run, engine in zip(runs, ("reference", "sparse")):
        main(["train", "--dry-run", "--model", "sab", "--engine", engine, "--out", str(run)])
    capsys.readouterr()
    out = tmp_path / "cmp.png"
    with mock.patch("matplotlib.axes.Axes.plot", autospec=True,
                    side_effect=lambda ax, *a, **k: [None]) as drawn:
        assert main(["plot", *sum((["--run", str(r)] for r in runs), []), "--out", str(out)]) == 0
    labels = [call.kwargs["label"] for call in drawn.call_args_list]
    assert labels == [f"{tmp_path.name}/a", f"{tmp_path.name}/b"]
    steps, accs = drawn.call_args_list[0].args[1:3]  # the run's eval_acc against the step
    logged = [json.loads(x) for x in (runs[0] / "metrics.jsonl").read_text().splitlines()]
    assert list(accs) == [m["eval_acc"] for m in logged if m.get("eval_acc") is not None]
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["plot", "--run", str(runs[0]), "--run", str(runs[1]), "--metric", "ce10",
                 "--out", str(out)]) == 0
    assert "no run logged eval_bpc" in _error(capsys, ["plot", "--run", str(runs[0]), "--run",
                                                      str(runs[1]), "--metric", "bpc"])
    assert "give --run more than once" in _error(capsys, ["plot", "--run", str(runs[0]),
                                                          "--out", str(out)])
    assert "not a run directory" in _error(capsys, ["plot", "--run", str(runs[0]), "--run",
                                                   str(tmp_path / "nope")])


def test_resume_with_other_settings_is_refused(tmp_path, capsys):
    main(["train", "--dry-run", "--out", str(tmp_path)])
    err = _error(capsys, ["train", "--dry-run", "--hidden", "9", "--out", str(tmp_path)])
    assert "model.hidden" in err and "another --out" in err


def test_a_sab_run_may_switch_engines_on_resume(tmp_path, capsys):
    """The engines compute the same gradients: a SAB run resumes with the other one; the sparse
    engine for a baseline is a usage error, not a traceback."""
    run = str(tmp_path / "run")
    main(["train", "--dry-run", "--model", "sab", "--out", run])
    assert main(["train", "--dry-run", "--model", "sab", "--steps", "4", "--engine", "sparse",
                 "--out", run]) == 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 4 and "backprop_fraction" in lines[-1]
    err = _error(capsys, ["train", "--dry-run", "--model", "lstm", "--engine", "sparse",
                          "--out", str(tmp_path / "lstm")])
    assert "engine 'sparse' trains SAB models" in err


def test_python_dash_m_sab_and_help():
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "sab", "train", "--help"], capture_output=True,
                         text=True, cwd=root, env={"PYTHONPATH": str(root), "PATH": ""})
    assert out.returncode == 0
    for flag in ("--k-trunc", "--k-top", "--k-att", "--batch-size", "--lr", "--clip",
                 "--hidden", "--seed", "--eval-every", "--engine", "--config", "--dry-run"):
        assert flag in out.stdout


def test_demo_dry_run_trains_both_models_and_writes_the_attention_map(tmp_path, capsys):
    """``sab demo --dry-run`` runs the demo's whole path (two processes, the table, the plots) in
    seconds: the demo's own flags must not override --dry-run's sizes."""
    assert main(["demo", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "SAB k_top=3" in out and "TBPTT k_trunc=5" in out and "no memory (chance)" in out
    assert (tmp_path / "sab" / "attention.png").exists()
    for name in ("sab", "tbptt"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["train"]["steps"] == 2 and config["model"]["hidden"] == 8
