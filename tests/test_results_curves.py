"""lra.results: learning curves, byte-identical regeneration, scratch output, and the --compare printout."""

import os

import pandas as pd
import pytest

from lra import results
from lra.results import curves
from tests.test_results import make_summary, write_runs

# Lightning's CSVLogger layout: one row per log call, the step is the index of the batch being finished.
METRICS_CSV = """\
epoch,lr-AdamW,perf/step_ms,perf/steps_per_s,step,train/loss,val/acc,val/acc_best,val/loss
,0.0,,,0,,,,
0,,,,0,2.30,,,
0,,20.0,50.0,1,2.20,,,
0,,,,1,,0.25,0.25,2.3
0,,,,2,2.10,,,
1,,30.0,33.3,3,2.00,,,
1,,,,3,,0.50,0.50,2.1
"""


def add_metrics(run_dir, text=METRICS_CSV):
    (run_dir / "csv").mkdir()
    (run_dir / "csv" / "metrics.csv").write_text(text)


def test_curve_from_lightning_metrics(tmp_path):
    add_metrics(tmp_path)
    curve = curves.read_curve(tmp_path, {"perf": {"step_ms": 99.0}})
    assert list(curve.columns) == curves.CURVE_COLUMNS
    # Validation after 2 and 4 steps trained (logged at steps 1 and 3).
    assert curve["step"].tolist() == [2, 4]
    assert curve["val_acc"].tolist() == [0.25, 0.5]
    assert curve["train_loss"].tolist() == [2.2, 2.0]
    # Steps trained × the running mean step time logged by then.
    assert curve["elapsed_s"].tolist() == pytest.approx([2 * 0.020, 4 * 0.030])


def test_curve_without_step_time_uses_the_summary_and_a_wall_clock_column_wins(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    add_metrics(plain, "step,train/loss,val/acc\n0,2.0,\n1,,0.3\n")
    assert curves.read_curve(plain, {"perf": {"step_ms": 100.0}})["elapsed_s"].tolist() == [0.2]
    timed = tmp_path / "timed"
    timed.mkdir()
    add_metrics(timed, "step,time/elapsed_s,val/acc\n0,5.0,\n1,7.5,0.3\n")
    assert curves.read_curve(timed)["elapsed_s"].tolist() == [7.5]
    empty = tmp_path / "empty"
    empty.mkdir()
    add_metrics(empty, "step,train/loss\n0,2.0\n")
    assert curves.read_curve(empty) is None
    assert curves.read_curve(tmp_path / "nothing") is None
    (empty / curves.CURVE_FILE).write_text("not,a\ncurve,file\n")
    assert curves.read_curve(empty) is None


def sweep_with_curves(root, runs):
    """A sweep folder whose runs have summaries and, where asked, Lightning metrics."""
    write_runs(root, [summary for summary, _ in runs])
    for folder, (_, with_metrics) in zip(sorted(root.iterdir()), runs, strict=True):
        if with_metrics:
            add_metrics(folder)
    return root


def committed_store(tmp_path):
    sweep = sweep_with_curves(
        tmp_path / "sweep",
        [
            (make_summary(seed=0, acc=0.30), True),
            (make_summary(seed=1, acc=0.32), True),
            (make_summary(attention="performer", acc=0.20), True),
            # No metrics: collected and tabulated, left out of the figure.
            (make_summary(attention="linformer", acc=0.25), False),
        ],
    )
    store = tmp_path / "store"
    results.collect_runs(sweep, store)
    return store


def test_collect_stores_curves_and_the_tables_link_the_figure(tmp_path):
    store = committed_store(tmp_path)
    stored = sorted(store.rglob(curves.CURVE_FILE))
    assert [path.parent.parent.name for path in stored] == ["performer", "softmax", "softmax"]
    assert pd.read_csv(stored[0])["step"].tolist() == [2, 4]
    out = tmp_path / "out"
    results.main(["--runs", str(store), "--out", str(out)])
    (figure,) = (out / "curves").iterdir()
    assert figure.name == "cpu_cpu-test-cpu-2-cores_listops.png"
    assert figure.read_bytes().startswith(b"\x89PNG")
    assert f"[listops](curves/{figure.name})" in (out / "lra.md").read_text()
    # A figure whose runs are gone is removed rather than left stale.
    for path in stored:
        path.unlink()
    results.main(["--runs", str(store), "--out", str(out)])
    assert not list((out / "curves").iterdir())
    assert "Learning curves" not in (out / "lra.md").read_text()


def test_regenerating_twice_gives_identical_bytes(tmp_path):
    store = committed_store(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    results.main(["--runs", str(store), "--out", str(first)])
    # A clone or a copy resets file times: they must not show in any output.
    for path in store.rglob("*"):
        os.utime(path, (4_000_000_000, 4_000_000_000))
    results.main(["--runs", str(store), "--out", str(second)])
    names = sorted(str(path.relative_to(first)) for path in first.rglob("*") if path.is_file())
    assert names == sorted(str(path.relative_to(second)) for path in second.rglob("*") if path.is_file())
    assert any(name.endswith(".png") for name in names) and "lra.json" in names
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert "timestamp" not in (first / "lra.json").read_text()


def test_the_summary_time_decides_between_duplicates(tmp_path):
    older = make_summary(acc=0.40) | {"finished_at": "2026-01-01T00:00:00+00:00"}
    newer = make_summary(acc=0.45) | {"finished_at": "2026-02-01T00:00:00+00:00"}
    # File times say the opposite: the summary's own time wins.
    write_runs(tmp_path / "a", [newer], mtime=1000)
    write_runs(tmp_path / "b", [older], mtime=2000)
    runs, _ = results.load_local_runs([tmp_path / "a", tmp_path / "b"])
    report = results.aggregate(runs)
    (kept,) = [run for run in report.runs if run.attention == "softmax"]
    assert kept.test_acc == 0.45


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A stand-in repository root with committed results, so the real results/ is never touched."""
    root = tmp_path / "repo"
    write_runs(root / "results" / "runs", [make_summary(acc=0.40)])
    (root / "results" / "lra.md").write_text("committed\n")
    monkeypatch.setattr(results, "REPO_ROOT", root)
    return root


def test_scratch_runs_never_overwrite_committed_results(repo, tmp_path):
    scratch = write_runs(tmp_path / "outputs", [make_summary(acc=0.90)])
    results.main(["--runs", str(scratch)])
    assert (repo / "results" / "lra.md").read_text() == "committed\n"
    assert "90.00 ± –" in (repo / "outputs" / "results" / "lra.md").read_text()
    # Committed runs plus scratch runs are scratch too.
    results.main(["--runs", str(repo / "results" / "runs"), str(scratch)])
    assert (repo / "results" / "lra.md").read_text() == "committed\n"
    # Naming results/ writes there.
    results.main(["--runs", str(scratch), "--out", str(repo / "results")])
    assert "90.00 ± –" in (repo / "results" / "lra.md").read_text()


def test_committed_runs_rebuild_committed_results(repo):
    # The default runs, and --collect ... --runs results/runs as make results-cpu calls it.
    results.main([])
    assert "40.00 ± –" in (repo / "results" / "lra.md").read_text()
    (repo / "results" / "lra.md").write_text("committed\n")
    results.main(["--runs", str(repo / "results" / "runs")])
    assert "40.00 ± –" in (repo / "results" / "lra.md").read_text()
    assert not (repo / "outputs").exists()


def compare_summaries():
    softmax = make_summary(attention="softmax", acc=0.268, steps=5.9, mem=0.98)
    taylorshift = make_summary(attention="taylorshift", acc=0.15, steps=2.3, mem=1.10)
    softmax["wall_time_s"], taylorshift["wall_time_s"] = 111.0, 260.0
    return softmax, taylorshift


def test_compare_prints_both_attentions_beside_the_rates(repo, tmp_path, capsys):
    runs = write_runs(tmp_path / "pair", compare_summaries())
    before = sorted(str(path) for path in tmp_path.rglob("*"))
    results.main(["--runs", str(runs), "--compare"])
    printed = capsys.readouterr().out
    assert sorted(str(path) for path in tmp_path.rglob("*")) == before, "--compare must write nothing"
    lines = printed.splitlines()
    assert lines[0] == f"listops · reduced (profile=cpu) · {'cpu: Test CPU (2 cores)'}"
    assert lines[1].split()[:5] == ["attention", "seeds", "config", "test", "acc"]
    softmax = next(line for line in lines if line.startswith("softmax"))
    taylorshift = next(line for line in lines if line.startswith("taylorshift"))
    assert lines.index(softmax) < lines.index(taylorshift)
    assert softmax.split()[3:8] == ["26.80", "26.80", "5.9", "111", "0.98"]
    assert taylorshift.split()[3:8] == ["15.00", "15.00", "2.3", "260", "1.10"]
    assert "chance (1/10 classes) 10.00%" in printed
    assert "majority class 17.00% (approximate" in printed
    # TaylorShift's 15% is below the 17% majority rate, softmax's 26.8% well above it: only one is named.
    notes = [line for line in lines if line.startswith("note:")]
    assert len(notes) == 1 and notes[0].startswith("note: taylorshift is at the majority-class rate")


def test_compare_uses_recorded_class_counts_and_averages_seeds(repo, tmp_path, capsys):
    softmax, taylorshift = compare_summaries()
    counts = {"test": {"0": 30, "1": 10, "9": 60}}
    summaries = [softmax, make_summary(attention="softmax", seed=1, acc=0.30), taylorshift]
    for summary in summaries:
        summary["data"]["class_counts"] = counts
    results.main(["--runs", str(write_runs(tmp_path / "pair", summaries)), "--compare"])
    printed = capsys.readouterr().out
    assert "majority class 60.00% (this run's test set (100 examples))" in printed
    softmax_line = next(line for line in printed.splitlines() if line.startswith("softmax"))
    assert softmax_line.split()[1] == "0,1" and "28.40 ± 2.26" in softmax_line


def test_compare_rejects_writing_options(tmp_path):
    with pytest.raises(SystemExit):
        results.main(["--runs", str(tmp_path), "--compare", "--out", str(tmp_path / "out")])


def test_the_hand_written_reading_heads_lra_md():
    report = results.Report(sections=[], runs=[], superseded=[], problems=[], roots=["results/runs"])
    text = results.render_markdown(report, None, "## Reading\n\nSoftmax learns; TaylorShift does not.\n")
    assert text.index(results.LRA_MD_HEADER) < text.index("## Reading") < text.index("No runs found")
    assert "## Reading" not in results.render_markdown(report)
