"""lra.results on synthetic summary.json files, and the W&B sweep grid composing into valid configs."""

import copy
import csv
import io
import json
import os
import statistics
import sys

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from lra import results
from tests.helpers import ATTENTIONS, ROOT, TASKS, compose_config

CPU = "cpu: Test CPU (2 cores)"
GPU = "NVIDIA H100 80GB HBM3"
BASE_CONFIG = {
    "model": {"n_layers": 2, "d_model": 64, "num_heads": 4},
    "data": {"seq_len": 512, "batch_size": 16, "data_root": "/somewhere", "seed": 0, "num_workers": 0},
    "optim": {"lr": 0.05},
    "scheduler": {"name": "rsqrt", "warmup_steps": 100},
    "trainer": {"max_steps": 400, "default_root_dir": "/run/dir"},
    "eval": {"checkpoint": "last"},
    "paths": {"output_dir": "/run/dir"},
    "attention": {"_target_": "models.attention.softmax.SoftmaxAttention"},
    "seed": 0,
}


def make_summary(
    task="listops",
    attention="softmax",
    seed=0,
    acc=0.5,
    profile="cpu",
    device=CPU,
    status="completed",
    steps=10.0,
    mem=1.0,
    config_changes=None,
    commit="a" * 40,
):
    config = copy.deepcopy(BASE_CONFIG)
    # Per-run keys that must not split a cell: seed, paths, the attention node.
    config["seed"] = config["data"]["seed"] = seed
    config["paths"]["output_dir"] = f"/runs/{task}/{attention}/{seed}"
    config["attention"]["_target_"] = f"models.attention.{attention}"
    for node, changes in (config_changes or {}).items():
        config[node].update(changes)
    metrics = {"val/acc_best": acc, "train/loss": 1.0}
    if acc is not None:
        metrics["test/acc"] = acc
    return {
        "task": task,
        "attention": attention,
        "profile": profile,
        "seed": seed,
        "status": status,
        "output_dir": f"/runs/{task}/{attention}/{seed}",
        "git_commit": commit,
        "device": device,
        "versions": {"torch": "2.x"},
        "config": config,
        "metrics": metrics,
        "perf": {"steps_per_s": steps, "peak_mem_gb": mem, "peak_mem_kind": "process_peak_rss"},
        "wall_time_s": 1.0,
        "data": {"task": task, "source": "generated", "seq_len": 512, "sizes": {}},
        "attention_values": [],
    }


def write_runs(root, summaries, mtime=None):
    for index, summary in enumerate(summaries):
        folder = root / f"{index}_{summary['task']}_{summary['attention']}_seed{summary['seed']}"
        folder.mkdir(parents=True)
        path = folder / "summary.json"
        path.write_text(json.dumps(summary))
        if mtime is not None:
            os.utime(path, (mtime, mtime))
    return root


def report_of(summaries):
    runs = [
        results.run_from_summary(summary, source=f"run{index}", timestamp=float(index))
        for index, summary in enumerate(summaries)
    ]
    return results.aggregate(runs)


def cell(report, task, attention, profile="cpu", device=CPU, main=True):
    (section,) = [s for s in report.sections if (s.profile, s.device) == (profile, device)]
    (found,) = [c for c in section.cells if (c.task, c.attention, c.main_variant) == (task, attention, main)]
    return found


def markdown_row(report, start):
    return next(row for row in results.render_markdown(report).splitlines() if row.startswith(start))


def test_mean_and_sample_std_over_seeds():
    report = report_of([make_summary(seed=seed, acc=acc) for seed, acc in enumerate([0.30, 0.36, 0.42])])
    found = cell(report, "listops", "softmax")
    assert found.n == 3
    assert found.acc_mean == pytest.approx(36.0)
    assert found.acc_std == pytest.approx(statistics.stdev([30.0, 36.0, 42.0]))
    assert "| 36.00 ± 6.00 | 3 | 0 |" in results.render_markdown(report)


def test_single_seed_shows_no_std():
    report = report_of([make_summary(acc=0.4)])
    assert cell(report, "listops", "softmax").acc_std is None
    assert "| 40.00 ± – | 1 |" in results.render_markdown(report)


def test_missing_cells_are_shown_not_dropped():
    report = report_of([make_summary(task="listops", attention="softmax")])
    (section,) = report.sections
    pairs = {(c.task, c.attention) for c in section.cells}
    assert pairs == {(task, attention) for task in results.LRA_TASKS for attention in ATTENTIONS}
    assert f"| {results.MISSING} | 0 | 0 |" in markdown_row(report, "| text | softmax |")
    rows = list(csv.DictReader(io.StringIO(results.render_csv(report))))
    assert len(rows) == len(results.LRA_TASKS) * len(ATTENTIONS)
    empty = next(row for row in rows if (row["task"], row["attention"]) == ("image", "performer"))
    assert empty["n_seeds"] == "0" and empty["test_acc_mean"] == ""


def test_failed_runs_are_counted_listed_and_not_averaged():
    summaries = [
        make_summary(seed=0, acc=0.40),
        make_summary(seed=1, acc=0.10, status="failed: RuntimeError: CUDA out of memory"),
        make_summary(seed=2, acc=None),
    ]
    report = report_of(summaries)
    found = cell(report, "listops", "softmax")
    assert found.n == 1 and found.acc_mean == pytest.approx(40.0)
    assert len(found.failed) == 2
    (section,) = report.sections
    assert {run.seed for run in section.failed} == {1, 2}
    markdown = results.render_markdown(report)
    assert "### Failed runs (2, not averaged)" in markdown
    assert "CUDA out of memory" in markdown and "completed without test/acc" in markdown
    assert "| softmax | 1: listops | 40.00 |" in markdown


def test_recipes_and_devices_are_never_mixed():
    summaries = [
        make_summary(profile="cpu", device=CPU, acc=0.20),
        make_summary(profile="official", device=GPU, acc=0.36),
        make_summary(profile="official", device="NVIDIA H200", acc=0.38),
    ]
    report = report_of(summaries)
    keys = [(section.profile, section.device) for section in report.sections]
    assert keys == [("official", GPU), ("official", "NVIDIA H200"), ("cpu", CPU)]
    assert cell(report, "listops", "softmax", "official", GPU).acc_mean == pytest.approx(36.0)
    assert cell(report, "listops", "softmax", "cpu", CPU).n == 1
    markdown = results.render_markdown(report)
    assert f"## Recipe: official · device: {GPU}" in markdown
    assert f"## Recipe: reduced (profile=cpu) · device: {CPU}" in markdown
    assert markdown.count("Not the official LRA recipe") == 1
    rows = list(csv.DictReader(io.StringIO(results.render_csv(report))))
    filled = [(row["recipe"], row["device"]) for row in rows if row["n_seeds"] != "0"]
    assert sorted(filled) == sorted(
        [("official", GPU), ("official", "NVIDIA H200"), ("reduced (profile=cpu)", CPU)]
    )


def test_a_run_with_other_training_settings_gets_its_own_row():
    summaries = [
        make_summary(seed=0, acc=0.30),
        make_summary(seed=1, acc=0.32),
        make_summary(attention="performer", acc=0.20),
        make_summary(seed=0, acc=0.90, config_changes={"model": {"d_model": 16}}),
    ]
    report = report_of(summaries)
    main = cell(report, "listops", "softmax")
    other = cell(report, "listops", "softmax", main=False)
    assert main.n == 2 and main.acc_mean == pytest.approx(31.0)
    assert other.n == 1 and other.variant != main.variant
    average = next(a for a in report.sections[0].averages if a.attention == "softmax")
    assert average.acc_mean == pytest.approx(31.0)
    assert f"other config {other.variant} (not averaged)" in results.render_markdown(report)


def test_paths_seed_and_attention_do_not_change_the_config_hash():
    one = make_summary(seed=0, attention="softmax")
    two = make_summary(seed=5, attention="performer")
    assert results.recipe_variant(one["config"]) == results.recipe_variant(two["config"])
    changed = make_summary(config_changes={"eval": {"checkpoint": "best_val"}})
    assert results.recipe_variant(changed["config"]) != results.recipe_variant(one["config"])


def test_speed_and_memory_relative_to_softmax():
    summaries = [
        make_summary(attention="softmax", steps=10.0, mem=2.0),
        make_summary(attention="softmax", seed=1, steps=30.0, mem=2.0),
        make_summary(attention="performer", steps=40.0, mem=1.0),
        make_summary(task="text", attention="performer", steps=5.0, mem=1.0),
    ]
    report = report_of(summaries)
    performer = cell(report, "listops", "performer")
    assert performer.steps_vs_softmax == pytest.approx(2.0)
    assert performer.mem_vs_softmax == pytest.approx(0.5)
    assert cell(report, "listops", "softmax").steps_vs_softmax == pytest.approx(1.0)
    # No softmax run on Text: no ratio rather than one against another task.
    assert cell(report, "text", "performer").steps_vs_softmax is None
    assert "| 40 | 2.00 | 1.00 | 0.50 |" in markdown_row(report, "| listops | performer")


def test_published_numbers_and_difference():
    summaries = [
        make_summary(attention="softmax", acc=0.4037),
        make_summary(attention="taylorshift", acc=0.30),
        make_summary(task="pathx", attention="softmax", acc=0.5),
    ]
    report = report_of(summaries)
    softmax = cell(report, "listops", "softmax")
    assert softmax.published == 36.37 and softmax.delta == pytest.approx(4.0)
    assert cell(report, "listops", "performer").published == 18.01
    assert cell(report, "listops", "linformer").published == 35.70
    taylorshift = cell(report, "listops", "taylorshift")
    assert taylorshift.published == "n/a (not in Table 1)" and taylorshift.delta is None
    assert cell(report, "listops", "fastmax").published == "n/a (not in Table 1)"
    pathx = cell(report, "pathx", "softmax")
    assert pathx.published == "FAIL" and pathx.delta is None
    assert "| 36.37 | +4.00 |" in markdown_row(report, "| listops | softmax")


def test_average_over_the_tasks_present_without_pathx():
    summaries = [
        make_summary(task="listops", acc=0.40),
        make_summary(task="text", acc=0.60),
        make_summary(task="pathx", acc=0.50),
        make_summary(task="listops", attention="fastmax", acc=0.30),
    ]
    report = report_of(summaries)
    averages = {average.attention: average for average in report.sections[0].averages}
    softmax = averages["softmax"]
    assert softmax.tasks == ["listops", "text"]
    assert softmax.acc_mean == pytest.approx(50.0)
    assert softmax.published == pytest.approx((36.37 + 64.27) / 2)
    assert averages["fastmax"].published == "n/a (not in Table 1)"
    assert averages["performer"].acc_mean is None
    assert "| softmax | 2: listops, text | 50.00 | 50.32 | -0.32 |" in results.render_markdown(report)


def test_duplicate_runs_count_once(tmp_path):
    first = write_runs(tmp_path / "a", [make_summary(acc=0.2, status="failed: boom")], mtime=1000)
    second = write_runs(tmp_path / "b", [make_summary(acc=0.3)], mtime=500)
    third = write_runs(tmp_path / "c", [make_summary(acc=0.4)], mtime=2000)
    runs, problems = results.load_local_runs([first, second, third])
    report = results.aggregate(runs)
    assert not problems
    found = cell(report, "listops", "softmax")
    assert found.n == 1 and found.acc_mean == pytest.approx(40.0) and not found.failed
    assert len(report.superseded) == 2


def test_cli_writes_every_output(tmp_path, capsys):
    runs = write_runs(tmp_path / "runs", [make_summary(seed=seed, acc=0.3 + seed / 100) for seed in range(3)])
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "summary.json").write_text("{not json")
    out = tmp_path / "out"
    results.main(["--runs", str(runs), "--out", str(out)])
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "lra.csv", "lra.json", "lra.md"]
    payload = json.loads((out / "lra.json").read_text())
    (section,) = payload["sections"]
    filled = [c for c in section["cells"] if c["n_seeds"]]
    assert filled[0]["seeds"] == [0, 1, 2] and filled[0]["test_acc_mean"] == pytest.approx(31.0)
    assert len(payload["runs"]) == 3 and "unreadable summary" in payload["problems"][0]
    readme = (out / "README.md").read_text()
    assert "python train.py task=listops attention=softmax profile=cpu seed=2" in readme
    assert "aaaaaaa" in readme and CPU in readme
    assert "unreadable summary" in (out / "lra.md").read_text()
    assert "3 runs (3 completed, 0 failed, 0 superseded)" in capsys.readouterr().out


def test_no_runs_still_writes_a_table(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    results.main(["--runs", str(empty), "--out", str(tmp_path / "out")])
    assert "No runs found" in (tmp_path / "out" / "lra.md").read_text()


def test_collect_copies_summaries_and_overrides(tmp_path):
    sweep = tmp_path / "multirun"
    write_runs(sweep, [make_summary(acc=0.4), make_summary(attention="performer", acc=0.3)])
    hydra_dir = sweep / "0_listops_softmax_seed0" / ".hydra"
    hydra_dir.mkdir()
    overrides = [
        "task=listops",
        "attention=softmax",
        "seed=0",
        "profile=cpu",
        "logger=csv",
        "hydra.sweep.dir=x",
    ]
    (hydra_dir / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    store = tmp_path / "store"
    copied = results.collect_runs(sweep, store)
    variant = results.recipe_variant(make_summary()["config"])
    target = store / "cpu" / "cpu-test-cpu-2-cores" / "listops" / "softmax" / f"seed0-{variant}"
    assert target / "summary.json" in copied and len(copied) == 2
    assert (target / "overrides.yaml").is_file()
    runs, _ = results.load_local_runs([store])
    softmax = next(run for run in runs if run.attention == "softmax")
    assert softmax.command == "python train.py task=listops attention=softmax seed=0 profile=cpu logger=csv"

    # A later failure of the same run never replaces the completed one.
    crashed = tmp_path / "crashed"
    write_runs(crashed, [make_summary(acc=0.1, status="failed: KeyboardInterrupt")], mtime=4_000_000_000)
    assert results.collect_runs(crashed, store) == []
    assert json.loads((target / "summary.json").read_text())["status"] == "completed"


def test_collect_of_a_missing_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        results.collect_runs(tmp_path / "nope", tmp_path / "store")


class FakeWandbRun:
    def __init__(self, config, summary, state="finished"):
        self.config, self.summary, self.state = config, summary, state
        self.url = "https://wandb.ai/me/lra/runs/abc"


def test_wandb_runs_join_the_table(monkeypatch, tmp_path):
    import wandb

    sweep_config = {
        **copy.deepcopy(BASE_CONFIG),
        # A W&B sweep locks the keys it set to its own plain values.
        "attention": "performer",
        "task": "listops",
        "seed": 1,
        "attention_name": "performer",
        "profile": "cpu",
        "device": CPU,
        "git_commit": "b" * 40,
    }
    fake_runs = [
        FakeWandbRun(sweep_config, {"test/acc": 0.25, "perf/steps_per_s": 12.0, "perf/peak_mem_gb": 1.0}),
        FakeWandbRun({**sweep_config, "seed": 2}, {"train/loss": 2.0}, state="crashed"),
    ]

    class FakeApi:
        def __init__(self, timeout=None):
            pass

        def runs(self, path):
            assert path == "me/lra"
            return fake_runs

    monkeypatch.setattr(wandb, "Api", FakeApi)
    local = write_runs(tmp_path / "runs", [make_summary(attention="performer", acc=0.35)])
    report = results.main(["--runs", str(local), "--out", str(tmp_path / "out"), "--wandb-project", "me/lra"])
    performer = cell(report, "listops", "performer")
    assert sorted(run.seed for run in performer.runs) == [0, 1]
    assert performer.acc_mean == pytest.approx(30.0)
    assert [run.status for run in performer.failed] == ["wandb state: crashed"]


def test_unreachable_wandb_falls_back_to_local_files(monkeypatch, tmp_path, capsys):
    import wandb

    def unreachable(*args, **kwargs):
        raise ConnectionError("api.wandb.ai unreachable")

    monkeypatch.setattr(wandb, "Api", unreachable)
    local = write_runs(tmp_path / "runs", [make_summary(acc=0.35)])
    report = results.main(["--runs", str(local), "--out", str(tmp_path / "out"), "--wandb-project", "me/lra"])
    assert cell(report, "listops", "softmax").n == 1
    assert "continuing with the local summary.json files only" in capsys.readouterr().err
    assert (tmp_path / "out" / "lra.md").is_file()


def test_module_runs_from_the_command_line(tmp_path):
    import subprocess

    local = write_runs(tmp_path / "runs", [make_summary(acc=0.35)])
    result = subprocess.run(
        [sys.executable, "-m", "lra.results", "--runs", str(local), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "35.00 ± –" in (tmp_path / "out" / "lra.md").read_text()


SWEEP = yaml.safe_load((ROOT / "sweep.yaml").read_text())


def sweep_values(name):
    parameter = SWEEP["parameters"][name]
    return parameter["values"] if "values" in parameter else [parameter["value"]]


def sweep_args(**values):
    """The Hydra overrides the W&B agent passes for one grid point (${args_no_hyphens}), from wandb itself."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    return create_sweep_command_args({"args": {key: {"value": value} for key, value in values.items()}})[
        "args_no_hyphens"
    ]


def test_sweep_is_a_grid_over_the_registry():
    assert SWEEP["program"] == "train.py" and SWEEP["method"] == "grid"
    assert SWEEP["command"] == ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]
    assert SWEEP["metric"] == {"name": "val/acc_best", "goal": "maximize"}
    logger = yaml.safe_load((ROOT / "conf" / "logger" / "wandb.yaml").read_text())
    assert SWEEP["project"] == logger["wandb"]["project"]
    assert sweep_values("attention") == ATTENTIONS  # every registered attention, in table order
    assert set(TASKS) <= set(sweep_values("task"))
    assert set(sweep_values("task")) == set(results.LRA_TASKS)
    assert sweep_values("seed") == [0, 1, 2]
    assert sweep_values("profile") == ["official"]
    assert sweep_args(attention="softmax", task="text", seed=1) == [
        "attention=softmax",
        "task=text",
        "seed=1",
    ]


def resolved(cfg):
    """Every node of a composed config, resolved as train.py sees it (with a stand-in output dir)."""
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/tmp/sweep-check"
    HydraConfig.instance().set_config(cfg)
    try:
        nodes = {key: cfg[key] for key in cfg if key != "hydra"}
        return {
            key: OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
            for key, node in nodes.items()
        }
    finally:
        HydraConfig.instance().cfg = None


@pytest.mark.parametrize("task", sweep_values("task"))
def test_every_sweep_combination_composes(task):
    """Each (attention, task) of the grid composes under the sweep's profile and the cpu one; seeds below."""
    if task not in TASKS:
        pytest.skip(f"conf/task/{task}.yaml is not in this checkout yet")
    fixed = {
        name: sweep_values(name)[0]
        for name in SWEEP["parameters"]
        if name not in ("attention", "task", "seed")
    }
    for attention in sweep_values("attention"):
        for profile in sorted({fixed["profile"], "cpu"}):
            args = sweep_args(**{**fixed, "attention": attention, "task": task, "profile": profile})
            cfg = compose_config(args)
            assert cfg.hydra.runtime.choices.attention == attention
            assert cfg.hydra.runtime.choices.profile == profile
            config = resolved(cfg)
            assert config["task"]["name"] == task
            assert config["attention"]["_target_"].startswith("models.attention.")
            assert config["trainer"]["max_steps"] > 0 and config["data"]["seq_len"] > 0
            assert f"profile={profile}" in config["logger"]["wandb"]["tags"]


def test_every_sweep_seed_composes():
    for seed in sweep_values("seed"):
        cfg = compose_config(sweep_args(attention="softmax", task="listops", seed=seed, profile="official"))
        config = resolved(cfg)
        assert config["seed"] == seed and config["data"]["seed"] == seed


@pytest.mark.slow
def test_a_real_multirun_is_collected_and_tabulated(tmp_path):
    """train.py -m on tiny ListOps, then --collect and the table, as `make results-cpu` does."""
    from tests.helpers import TINY_MODEL, run_train
    from tests.tiny.listops import tiny_overrides

    sweep = tmp_path / "multirun"
    grid = ["-m", "task=listops", "attention=softmax,performer", "seed=0", "profile=cpu", "logger=csv"]
    overrides = [*grid, *tiny_overrides(tmp_path), *TINY_MODEL, f"hydra.sweep.dir={sweep}"]
    result = run_train(overrides, tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    store, out = tmp_path / "store", tmp_path / "out"
    report = results.main(
        ["--collect", str(sweep), "--collect-into", str(store), "--runs", str(store), "--out", str(out)]
    )
    assert len(list(store.rglob("summary.json"))) == 2 and len(list(store.rglob("overrides.yaml"))) == 2
    (section,) = report.sections
    assert section.profile == "cpu" and section.device.startswith("cpu")
    performer = cell(report, "listops", "performer", device=section.device)
    assert performer.n == 1 and performer.steps_vs_softmax > 0
    readme = (out / "README.md").read_text()
    assert "python train.py task=listops attention=performer seed=0 profile=cpu logger=csv" in readme


def test_committed_runs_keep_their_cells_across_the_model_node_layout():
    """Runs written before ``model`` named its constructor kept attn_dropout in it: the same recipe in today's
    layout hashes the same, and today's configs give every committed run's model node and attn_dropout."""
    composed = {}
    for path in sorted((ROOT / "results" / "runs").rglob("summary.json")):
        summary = json.loads(path.read_text())
        recorded = summary["config"]
        model = dict(recorded["model"])
        attn_dropout = model.pop("attn_dropout")
        today = {
            **recorded,
            "model": {"_target_": "models.heads.LRAModel", **model},
            "attn_dropout": attn_dropout,
        }
        assert results.recipe_variant(today) == results.recipe_variant(recorded) == path.parent.name[-8:]
        if summary["task"] not in composed:
            cfg = compose_config([f"task={summary['task']}", "profile=cpu"])
            composed[summary["task"]] = (OmegaConf.to_container(cfg.model), cfg.attn_dropout)
        assert composed[summary["task"]] == (today["model"], attn_dropout), path
