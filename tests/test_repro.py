"""`sab repro`: the row table, the paper's numbers, running rows (resumable) and the report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sab.cli import main
from sab.repro import (OLD_DRAW_NOTE, PAPER_FILE, ROWS, TRANSFER, TRANSFER_T, paper_numbers,
                       row_config, run_rows, run_transfer, select_rows, write_report)
from sab.tasks import build_task
from sab.trainer import Trainer


def test_copying_rows_cover_spec_section_7():
    """Every copying row of SPEC §7 (and the issue's T = 200, 300), with the paper's settings."""
    want = {("lstm", None, None), ("selfattn", None, None)}
    want |= {("tbptt", k, None) for k in (1, 5, 10, 20)}
    want |= {("sab", kt, kp) for kt, kp in ((1, 1), (1, 10), (5, 5), (10, 10))}
    for T in (100, 200, 300):
        rows = [r for r in ROWS.values() if r.table == f"copy{T}"]
        got = {(r.model["name"], r.model.get("k_trunc"), r.model.get("k_top")) for r in rows}
        assert got == want, T
        for r in rows:
            config = row_config(r)
            assert config.task == "copy" and config.task_options["T"] == T
            assert (config.model.hidden, config.train.lr, config.train.batch_size,
                    config.train.clip) == (128, 1e-3, 64, 1.0)
            if r.model["name"] == "sab":
                assert config.model.k_att == 2
    for T in (200, 400):
        assert any(r.table == f"adding{T}" for r in ROWS.values())
    for table in ("ptb", "text8", "pmnist"):
        assert any(r.table == table for r in ROWS.values())
    assert {"ptb-lstm", "ptb-tbptt-5", "ptb-sab-5-5"} <= set(ROWS)
    assert all(r.startswith("copy100-") for r in TRANSFER)
    assert tuple(TRANSFER_T) == (200, 300, 400, 2000, 5000)


def test_sab_rows_use_delta_grad_and_the_ablations_hold_delta_constant():
    """SAB rows: scores blocked, δ's gradient to the scorer; each ``-const-delta`` row is the
    same row with δ constant (SPEC §2.4), and only those differ from the rows' settings."""
    sab_rows = [r for r in ROWS.values() if r.model.get("name") == "sab"]
    assert sab_rows
    ablations = [r for r in sab_rows if r.name.endswith("-const-delta")]
    assert {r.name for r in ablations} == {"copy100-sab-5-5-const-delta",
                                          "ptb-sab-5-5-const-delta"}
    for r in sab_rows:
        config = row_config(r)
        assert config.model.block_score_grad and config.model.att_eps == 0.01
        assert config.model.delta_grad == (r not in ablations)
    for r in ablations:
        base = ROWS[r.name[:-len("-const-delta")]]
        assert r.table == base.table and r.task_options == base.task_options
        assert {k: v for k, v in r.model.items() if k != "delta_grad"} == \
            {k: v for k, v in base.model.items() if k != "delta_grad"}


def test_the_one_hot_tbptt_row_differs_from_its_row_only_in_the_input_encoding():
    row, base = ROWS["copy100-tbptt-5-onehot"], ROWS["copy100-tbptt-5"]
    assert row.model == base.model and row.train == base.train and row.table == base.table
    assert row.task_options == {**base.task_options, "one_hot": True}
    assert row_config(row).task_options["one_hot"] and not row_config(base).task_options.get(
        "one_hot", False)
    assert [r.name for r in ROWS.values() if r.task_options.get("one_hot")] == [row.name]


@pytest.mark.parametrize("seed", [1, 2])
def test_the_seed_tbptt_rows_differ_from_their_row_only_in_the_seed(seed):
    row, base = ROWS[f"copy100-tbptt-5-seed{seed}"], ROWS["copy100-tbptt-5"]
    assert row.model == base.model and row.task_options == base.task_options
    assert row.table == base.table and row.label == base.label + f", seed {seed}"
    assert row.train == {**base.train, "seed": seed}
    config, base_config = row_config(row), row_config(base)
    assert (config.train.seed, base_config.train.seed) == (seed, 0)
    # the evaluation set is drawn from the task's own seed, not the training seed: the same
    task, base_task = (build_task(c.task, **c.task_options) for c in (config, base_config))
    assert torch.equal(task.eval_generator().get_state(), base_task.eval_generator().get_state())
    assert [r.name for r in ROWS.values() if r.train.get("seed", 0) != 0] == \
        ["copy100-tbptt-5-seed1", "copy100-tbptt-5-seed2"]


def test_the_fashion_mnist_rows_are_the_pmnist_rows_on_fashion_mnist_without_a_paper_number():
    """pfmnist (SPEC §10's stand-in for permuted MNIST) has the pmnist rows' models and budget,
    reads Fashion-MNIST with the same permutation, and has no paper number; SAB rows classified
    from the last step train with the sparse engine, the baseline with full BPTT."""
    for model in ("lstm", "sab-5-5"):
        row, base = ROWS[f"pfmnist-{model}"], ROWS[f"pmnist-{model}"]
        assert (row.model, row.train, row.label) == (base.model, base.train, base.label)
        config, base_config = row_config(row, data_dir="/data"), row_config(base, data_dir="/data")
        assert config.task_options["dataset"] == "fashion_mnist"
        assert base_config.task_options["dataset"] == "mnist"
        for c in (config, base_config):
            assert c.task_options["permuted"] and c.task_options["data_dir"] == "/data"
            assert c.task_options["perm_seed"] == base_config.task_options["perm_seed"]
            assert c.train.engine == ("sparse" if model.startswith("sab") else "reference")
    assert not [k for k in paper_numbers() if k.startswith("pfmnist")]


def test_paper_numbers_load_and_cite_their_status():
    raw = json.loads(Path(PAPER_FILE).read_text())
    entries = paper_numbers()
    assert entries and set(entries) == set(raw["entries"])
    for key, e in entries.items():
        assert e["status"] in ("quoted", "recalled"), key
        assert "SPEC §7" in e["source"], key
        assert e["approx"] == (e["status"] == "recalled"), key
    # SPEC §7: 31% (TBPTT 5) and 100% (SAB 5,5) are quoted; the rest of the T=100 table recalled
    assert {k for k, e in entries.items() if e["status"] == "quoted"} == \
        {"copy100-tbptt-5", "copy100-sab-5-5"}
    for name in ("copy100-lstm", "copy100-tbptt-1", "copy100-tbptt-10", "copy100-tbptt-20",
                 "copy100-selfattn", "copy100-sab-1-1", "copy100-sab-10-10"):
        assert entries[name]["status"] == "recalled"
    assert entries["copy100-tbptt-5"]["value"] == 0.31


def test_paper_numbers_reject_an_entry_without_status(tmp_path):
    raw = json.loads(Path(PAPER_FILE).read_text())
    del raw["entries"]["copy100-lstm"]["status"]
    bad = tmp_path / "paper.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="copy100-lstm"):
        paper_numbers(bad)


def test_select_rows_keeps_order_and_expands_patterns():
    assert [r.name for r in select_rows(["copy100-tbptt-5", "copy100-sab-5-5"])] == \
        ["copy100-tbptt-5", "copy100-sab-5-5"]
    assert len(select_rows(["copy200-*"])) == 10
    with pytest.raises(ValueError, match="no row"):
        select_rows(["copy999-lstm"])


def _fake_run(results: Path):
    run = results / "runs" / "copy100-sab-5-5"
    run.mkdir(parents=True)
    metrics = [{"step": 0, "time": 0.5, "eval_acc": 0.125},
               {"step": 200, "time": 90.0, "eval_acc": 0.5},
               {"step": 400, "time": 185.0, "eval_acc": 0.45}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "status.json").write_text(json.dumps({"row": "copy100-sab-5-5", "step": 450,
                                                 "planned": 200000, "wall_s": 200.0}))
    (run / "hardware.json").write_text(json.dumps({"sessions": [
        {"cpu": "Test CPU 9000", "cores": 2, "threads": 1, "gpu": None, "torch": "2.0"}]}))
    (run / "eval.jsonl").write_text(json.dumps({"step": 400, "T": 5000, "trained_T": 100,
                                                "acc": 0.3, "seconds": 61, "eval_size": 64}) + "\n"
                                    + json.dumps({"step": 450, "T": 100, "trained_T": 100,
                                                  "acc": 0.3, "eval_size": 512,
                                                  "eval_block": 128,
                                                  "acc_by_position": [1, 1] + [1 / 8] * 8})
                                    + "\n")
    (results / "runs" / "copy100-lstm").mkdir()  # a run directory without any data


def test_report_from_a_fake_recorded_run(tmp_path):
    _fake_run(tmp_path)
    path = write_report(tmp_path)
    text = path.read_text()
    line = next(x for x in text.splitlines() if "`copy100-sab-5-5`" in x)
    assert "100% (quoted)" in line
    assert "45.0% (step 400); best 50.0% (step 200)" in line
    assert "450 / 200,000 (unfinished)" in line
    assert "3 min 20 s" in line and "Test CPU 9000, 2 cores, 1 thread, torch 2.0" in line
    assert "no data" in next(x for x in text.splitlines() if "`copy100-lstm`" in x)
    tbptt = next(x for x in text.splitlines() if "`copy100-tbptt-5`" in x)
    assert "31% (quoted)" in tbptt and "not run" in tbptt
    assert "≈98.8% (recalled)" in text
    transfer = next(x for x in text.splitlines()
                    if x.startswith("| SAB (k_trunc=5, k_top=5, k_att=2), T = 100 → 5,000"))
    assert "≈40% (recalled)" in transfer and "30.0% (64 sequences †)" in transfer
    # that line has no eval_block (drawn batch by batch, before the fixed blocks): marked, and
    # the mark explained once, under the transfer table; the per-position line has one
    assert text.count(OLD_DRAW_NOTE) == 1
    assert text.index(OLD_DRAW_NOTE) > text.index("## Transfer")
    assert text.count("not run") >= len(ROWS) - 2
    assert (tmp_path / "figures" / "copy100_curves.png").exists()
    assert (tmp_path / "figures" / "transfer.png").exists()
    assert "figures/copy100_curves.png" in text
    # the per-position line at the trained T (not the transfer one at T = 5000) makes a table
    position = next(x for x in text.splitlines()
                    if x.startswith("| SAB (k_trunc=5, k_top=5, k_att=2) `copy100-sab-5-5` | 450"))
    assert position.endswith("| 450 | 100% | 100% | " + "12% | " * 8 + "30.0% |")
    assert text.count("Accuracy at each recalled digit") == 1  # copy200/300 have no such line


def test_repro_run_trains_and_resumes(tmp_path):
    (row,) = select_rows(["copy100-sab-5-5"])
    logs = []
    assert run_rows([row], tmp_path, steps=2, dry_run=True, plot=False, log=logs.append) == 0
    run = tmp_path / "runs" / row.name
    assert json.loads((run / "status.json").read_text())["step"] == 2
    assert run_rows([row], tmp_path, steps=4, dry_run=True, plot=False, log=logs.append,
                    max_minutes=30, patience=1000, min_delta=0.005) == 0
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    status = json.loads((run / "status.json").read_text())
    assert status["step"] == 4 and status["dry_run"]
    hw = json.loads((run / "hardware.json").read_text())["sessions"]
    assert len(hw) == 2 and hw[-1]["step_at_end"] == 4 and hw[0]["torch"] == torch.__version__
    # each invocation is recorded with the options that decide where it stops
    assert (run / "cmd.txt").read_text().splitlines() == [
        "sab repro run copy100-sab-5-5 --steps 2 --dry-run",
        "sab repro run copy100-sab-5-5 --steps 4 --max-minutes 30 --patience 1000 "
        "--min-delta 0.005 --dry-run"]
    assert (run / "config.json").exists() and (run / "ckpt.pt").exists()
    text = write_report(tmp_path, figures=False).read_text()
    assert "dry run" in next(x for x in text.splitlines() if "`copy100-sab-5-5`" in x)


def test_transfer_reads_a_t100_run_at_longer_t_and_times_only_the_evaluation(tmp_path,
                                                                             monkeypatch):
    """One line per T in the run's eval.jsonl, with the checkpoint's step and the hardware; the
    C++ kernels are built before the first evaluation (here and in `sab eval`, which writes the
    same lines), so their build is not in its seconds; a row without a checkpoint is named and
    makes the exit code 1."""
    import sab.native
    import sab.tasks

    (row,) = select_rows(["copy100-sab-5-5"])
    assert run_rows([row], tmp_path, steps=2, dry_run=True, plot=False, log=lambda _: None) == 0
    calls = []
    kernels, evaluate = sab.native.kernels, sab.tasks.CopyingTask.evaluate
    monkeypatch.setattr(sab.native, "kernels",
                        lambda *a, **k: calls.append("kernels") or kernels(*a, **k))
    monkeypatch.setattr(sab.tasks.CopyingTask, "evaluate",
                        lambda *a, **k: calls.append("evaluate") or evaluate(*a, **k))
    logs = []
    assert run_transfer([row.name], tmp_path, lengths=(7, 12), eval_size=8, eval_batch=4,
                        chunk_len=5, log=logs.append) == 0
    assert calls[0] == "kernels" and calls.count("evaluate") == 2
    lines = [json.loads(x) for x in
             (tmp_path / "runs" / row.name / "eval.jsonl").read_text().splitlines()]
    trained_T = json.loads((tmp_path / "runs" / row.name / "config.json").read_text())[
        "task"]["T"]  # the dry run's short sequences
    assert [(x["T"], x["trained_T"], x["step"], x["eval_size"], x["eval_block"])
            for x in lines] == [(7, trained_T, 2, 8, 128), (12, trained_T, 2, 8, 128)]
    assert all(0 <= x["acc"] <= 1 and x["seconds"] >= 0 and "torch" in x["hardware"]
               for x in lines)
    assert len(logs) == 2
    calls.clear()  # `sab eval`, the other command that times evaluations: the same order
    assert main(["eval", "--run", str(tmp_path / "runs" / row.name), "--T", "7"]) == 0
    assert calls[0] == "kernels" and calls.count("evaluate") == 1
    last = json.loads((tmp_path / "runs" / row.name / "eval.jsonl").read_text().splitlines()[-1])
    assert (last["T"], last["step"]) == (7, 2) and "torch" in last["hardware"]  # report-ready
    assert run_transfer(["copy100-lstm"], tmp_path, lengths=(7,), log=logs.append) == 1
    assert "copy100-lstm: no checkpoint" in logs[-1]


def test_report_draws_copy200_attention_from_a_t100_model_without_a_t200_run(tmp_path):
    """No `copy200-sab-5-5` run: the report's T=200 attention map is a T=100 SAB model read at
    T=200, and the report says so."""
    (row,) = select_rows(["copy100-sab-5-5"])
    assert run_rows([row], tmp_path, steps=2, dry_run=True, plot=False, log=lambda _: None) == 0
    text = write_report(tmp_path).read_text()
    fig = tmp_path / "figures" / "attention_copy200_from_copy100-sab-5-5.png"
    assert fig.exists() and fig.stat().st_size > 0
    assert f"figures/{fig.name}" in text and "**trained at T=100**" in text
    assert "has not been run" in text and "figures/attention_copy200.png" not in text


def test_report_draws_an_unfinished_copy200_run_beside_the_t100_model(tmp_path):
    """An unfinished `copy200-sab-5-5` run: its own map, captioned with its step and accuracy,
    and the T=100 model's read at T=200 beside it."""
    rows = select_rows(["copy100-sab-5-5", "copy200-sab-5-5"])
    assert run_rows(rows, tmp_path, steps=2, dry_run=True, plot=False, log=lambda _: None) == 0
    text = write_report(tmp_path).read_text()
    assert "![attention map, copying T=200](figures/attention_copy200.png)" in text
    assert "`copy200-sab-5-5` at its last checkpoint (step 2; accuracy" in text
    assert "(`copy200-sab-5-5` is unfinished)" in text
    for name in ("attention_copy200.png", "attention_copy200_from_copy100-sab-5-5.png"):
        assert (tmp_path / "figures" / name).stat().st_size > 0


def test_report_captions_a_copy200_run_stopped_by_patience(tmp_path):
    """A `copy200-sab-5-5` run that `--patience` stopped before its planned steps: the T=100
    model's map beside it is captioned with that, not as unfinished."""
    rows = select_rows(["copy100-sab-5-5", "copy200-sab-5-5"])
    assert run_rows(rows, tmp_path, steps=2, dry_run=True, plot=False, log=lambda _: None) == 0
    # planned on to 4 steps, `--patience 1` with an improvement no accuracy can make: it stops
    assert run_rows(rows[1:], tmp_path, steps=4, dry_run=True, plot=False, patience=1,
                    min_delta=1.0, log=lambda _: None) == 0
    status = json.loads((tmp_path / "runs" / "copy200-sab-5-5" / "status.json").read_text())
    assert status["plateau"] and status["step"] < 4
    text = write_report(tmp_path).read_text()
    assert "(`copy200-sab-5-5` stopped improving before its planned steps)" in text
    assert "is unfinished)" not in text


def test_stop_requested_checkpoints_and_resumes_exactly(tmp_path):
    """A run stopped between checkpoints (the signal path of `repro run`) resumes to the same
    weights as an uninterrupted run."""
    config = row_config(ROWS["copy100-tbptt-5"], steps=5, dry_run=True)
    config.train.ckpt_every = 4
    whole = Trainer(config, tmp_path / "whole")
    whole.run()

    def stop_at_3(trainer, line):
        if trainer.step == 3:
            trainer.stop_requested = True
    first = Trainer(config, tmp_path / "split", callbacks=[stop_at_3])
    first.run()
    assert first.step == 3
    second = Trainer(config, tmp_path / "split")
    second.run()
    assert second.step == 5
    for a, b in zip(whole.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text().count("\n") == \
        (tmp_path / "split" / "metrics.jsonl").read_text().count("\n")


def test_cli_repro_list_and_bad_row(tmp_path, capsys):
    assert main(["repro", "list", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "copy100-sab-5-5" in out and "not run" in out
    assert main(["repro", "run", "no-such-row", "--results", str(tmp_path)]) == 2
    assert main(["repro", "report", "--results", str(tmp_path), "--no-figures"]) == 0
    assert (tmp_path / "README.md").exists()


def test_report_updates_the_summary_block_of_a_readme(tmp_path):
    _fake_run(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- repro-summary -->\nold\n<!-- /repro-summary -->\nrest\n")
    write_report(tmp_path / "results", figures=False, readme=readme)
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("rest\n") and "old" not in text
    assert "| Copying, T = 100: SAB (k_trunc=5, k_top=5, k_att=2) `copy100-sab-5-5` | 100% (quoted)" \
        in text
    assert "`copy100-tbptt-5`" not in text  # rows without data stay in results/README.md only


def test_a_diverged_row_records_where_and_the_report_says_so(tmp_path, monkeypatch):
    from sab.trainer import NonFiniteLoss
    original = Trainer.train_step

    def train_step(self):
        if self.step == 1:
            raise NonFiniteLoss("non-finite gradient norm (inf) at step 2", 2)
        return original(self)
    monkeypatch.setattr(Trainer, "train_step", train_step)
    (row,) = select_rows(["copy100-lstm"])
    assert run_rows([row], tmp_path, steps=3, dry_run=True, plot=False, log=lambda m: None) == 1
    status = json.loads((tmp_path / "runs" / row.name / "status.json").read_text())
    assert status["diverged_at"] == 2 and status["step"] == 1
    assert "non-finite" in status["stopped"]
    text = write_report(tmp_path, figures=False).read_text()
    assert "diverged: non-finite gradient at step 2" in \
        next(x for x in text.splitlines() if "`copy100-lstm`" in x)


def test_metrics_are_formatted_with_the_digits_they_need():
    from sab.repro import _fmt_metric
    assert _fmt_metric(0.9109375, "acc") == "91.1%"
    assert _fmt_metric(1.0, "acc") == "100.0%"
    assert _fmt_metric(0.9996, "acc") == "99.96%"  # a miss is never shown as "100.0%"
    assert _fmt_metric(0.99998, "acc") == "99.998%"
    assert _fmt_metric(0.9994, "acc") == "99.9%"
    assert _fmt_metric(1.74213, "bpc") == "1.742"
    assert _fmt_metric(0.000558409, "mse") == "0.000558"  # not "0.001"
    assert _fmt_metric(0.1667, "mse") == "0.167"
    assert _fmt_metric(None, "mse") == "–"


def test_the_gpu_script_resumes_rows_and_copies_their_run_directories(tmp_path):
    """benchmarks/gpu_repro.sh, as the device tool runs it (here on the CPU): each row resumes
    from its run directory and the whole directory comes back under $OUT/runs/."""
    root = Path(__file__).resolve().parents[1]
    results, out = tmp_path / "results", tmp_path / "out"
    rows = select_rows(["copy100-lstm", "adding400-lstm"])
    assert run_rows(rows[:1], results, steps=2, dry_run=True, plot=False, log=lambda s: None) == 0
    env = {**os.environ, "OUT": str(out), "RESULTS": str(results), "PYTHON": sys.executable,
           "ROWS": "copy100-lstm adding4*-lstm", "MINUTES": "5", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_repro.sh", "--dry-run", "--steps", "3"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["adding400-lstm", "copy100-lstm"]
    copied = out / "runs" / "copy100-lstm"
    steps = [json.loads(x)["step"] for x in (copied / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3]  # resumed at 2, not restarted
    assert len(json.loads((copied / "hardware.json").read_text())["sessions"]) == 2
    assert (copied / "ckpt.pt").exists() and (out / "repro_run.log").stat().st_size > 0


def test_plateau_is_the_best_evaluation_that_is_patience_steps_old():
    from sab.repro import plateau
    rising = [(0, 0.1), (200, 0.2), (400, 0.3), (600, 0.4)]
    assert plateau(rising, True, 200) is None  # the last evaluation is the best
    flat = [(0, 0.1), (200, 0.5), (400, 0.5), (600, 0.4), (800, 0.45)]
    assert plateau(flat, True, 600) == {"best": 0.5, "best_step": 200, "last_step": 800,
                                        "patience": 600, "min_delta": 0.0}
    assert plateau(flat, True, 601) is None  # 600 steps since the best: not yet 601
    # lower is better (bpc, mse); an evaluation without the metric (None, NaN) is skipped
    bpc = [(0, 3.0), (1000, 1.7), (2000, None), (3000, float("nan")), (4000, 1.75)]
    assert plateau(bpc, False, 3000)["best_step"] == 1000
    assert plateau(bpc, True, 3000)["best_step"] == 0  # read as higher-is-better: 3.0 at 0
    # min_delta: gains of at most min_delta do not move the best
    creeping = [(0, 0.900), (200, 0.902), (400, 0.904), (600, 0.906), (800, 0.908)]
    assert plateau(creeping, True, 200) is None
    # 0.902 and 0.904 are within 0.005 of 0.900; 0.906 is 0.006 above it, 0.908 only 0.002
    assert plateau(creeping, True, 200, min_delta=0.005)["best_step"] == 600
    assert plateau(creeping, True, 200, min_delta=0.01)["best"] == 0.900
    assert plateau([], True, 1) is None and plateau([(5, None)], True, 1) is None
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="patience"):
            plateau(flat, True, bad)
    for bad in (-0.1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="min_delta"):
            plateau(flat, True, 10, bad)


def test_patience_stops_a_row_when_its_metric_stops_improving_and_the_report_says_so(tmp_path):
    """`repro run --patience`: judged on the whole recorded history, so a row that had already
    stopped improving is not trained; one that had not trains until it stops; a later run
    without --patience continues it."""
    (row,) = select_rows(["copy100-lstm"])
    run = tmp_path / "runs" / row.name
    quiet = lambda s: None  # noqa: E731
    assert run_rows([row], tmp_path, steps=4, dry_run=True, plot=False, log=quiet) == 0

    # min_delta 1.0: no accuracy beats another by more than 1, so the best stays at step 0
    assert run_rows([row], tmp_path, steps=50, dry_run=True, plot=False, log=quiet,
                    patience=6, min_delta=1.0) == 0
    status = json.loads((run / "status.json").read_text())
    assert status["step"] == 6 and not status["finished"]
    assert status["plateau"]["best_step"] == 0 and status["plateau"]["last_step"] == 6
    assert status["stopped"].startswith("stopped improving: none better than ")
    assert status["stopped"].endswith(" at step 0 by more than 100 points in the 6 steps after "
                                      "it; --patience 6")
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7))
    line = next(x for x in write_report(tmp_path, figures=False).read_text().splitlines()
                if "`copy100-lstm`" in x)
    assert "6 / 50 (stopped improving: none better than " in line
    assert " at step 0 by more than 100 points in the 6 steps after it; --patience 6)" in line
    assert "unfinished" not in line
    assert "leaves it out" not in write_report(tmp_path, figures=False).read_text()
    # a stopped row whose checkpoint was taken out of git: the header names it
    (run / ".gitignore").write_text("ckpt.pt\n")
    assert ("(their `ckpt.pt` is kept too, except where the run directory's `.gitignore` leaves "
            "it out: `copy100-lstm`)") in write_report(tmp_path, figures=False).read_text()
    (run / ".gitignore").unlink()

    # already stopped improving: not trained, nothing written but the status
    logs = []
    ckpt = (run / "ckpt.pt").read_bytes()
    assert run_rows([row], tmp_path, steps=50, dry_run=True, plot=False, log=logs.append,
                    patience=3, min_delta=1.0) == 0
    assert "not trained" in logs[-1] and (run / "ckpt.pt").read_bytes() == ckpt
    assert json.loads((run / "status.json").read_text())["plateau"]["patience"] == 3
    assert len(json.loads((run / "hardware.json").read_text())["sessions"]) == 2

    # without --patience it trains on, and is no longer "stopped improving"
    assert run_rows([row], tmp_path, steps=8, dry_run=True, plot=False, log=quiet) == 0
    status = json.loads((run / "status.json").read_text())
    assert status["step"] == 8 and "plateau" not in status and "stopped" not in status
    assert "(unfinished)" not in next(
        x for x in write_report(tmp_path, figures=False).read_text().splitlines()
        if "`copy100-lstm`" in x)  # 8 of the dry run's 8: finished


def test_cli_repro_run_checks_patience_and_min_delta(tmp_path, capsys):
    base = ["repro", "run", "copy100-lstm", "--results", str(tmp_path)]
    for flags, message in ((["--patience", "0"], "expected an integer >= 1"),
                           (["--patience", "5", "--min-delta", "-1"], "finite number >= 0"),
                           (["--patience", "5", "--min-delta", "nan"], "finite number >= 0")):
        with pytest.raises(SystemExit):
            main(base + flags)
        assert message in capsys.readouterr().err
    assert main(base + ["--min-delta", "0.01"]) == 2
    assert "--min-delta needs --patience" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_finished_row_is_not_trained_again_even_without_its_checkpoint(tmp_path):
    """A finished row's checkpoint is left out of git: on a fresh clone `repro run` must neither
    start it over nor touch its recorded metrics."""
    (row,) = select_rows(["copy100-lstm"])
    quiet = lambda s: None  # noqa: E731
    assert run_rows([row], tmp_path, steps=4, dry_run=True, plot=False, log=quiet) == 0
    run = tmp_path / "runs" / row.name
    assert (run / ".gitignore").read_text() == "ckpt.pt\n"
    (run / "ckpt.pt").unlink()  # what a fresh clone has
    recorded = {p.name: p.read_bytes() for p in run.iterdir()}
    logs = []
    assert run_rows([row], tmp_path, steps=4, dry_run=True, plot=False, log=logs.append) == 0
    assert "finished (4 of 4 planned steps); nothing to train" in logs[-1]
    # asked for more steps, it cannot resume: it says so and changes nothing
    assert run_rows([row], tmp_path, steps=6, dry_run=True, plot=False, log=logs.append) == 1
    assert "no checkpoint ckpt.pt" in logs[-1]
    assert {p.name: p.read_bytes() for p in run.iterdir()} == recorded
