"""What a new user meets on the command line (issue 17): user errors without tracebacks, Hydra's options in
any order, scratch output that never lands in results/, a short banner, and a --help that lists the registry.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.utils import get_args_parser

from lra import cli
from lra.errors import ConfigError, MissingDataError, UserError, run_cli
from tests.helpers import ATTENTIONS, CONF, ROOT, TASKS, TINY_MODEL, read_summaries, run_train
from tests.tiny.listops import tiny_overrides as tiny_listops

PROFILES = sorted(path.stem for path in (CONF / "profile").glob("*.yaml"))


def _run_module(args: list[str], cwd: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    """``python -m <module> ...`` as a user runs it, from ``cwd`` (outside the repository)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WANDB_MODE": "offline",
        "HYDRA_FULL_ERROR": "1" if full_error else "0",
        "LRA_DATA_DIR": str(cwd / "lra-data"),
    }
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _assert_user_error(result: subprocess.CompletedProcess, *expected: str) -> None:
    """Non-zero exit, the message on stderr, no traceback."""
    assert result.returncode != 0, result.stdout[-2000:]
    for text in expected:
        assert text in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "HYDRA_FULL_ERROR=1" in result.stderr


# -- item 1: user errors print a message, not a traceback ----------------------------------------------------


def _bad_listops_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "bad-listops"
    folder.mkdir()
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_text("Expression\tLabel\n( MAX 1 2 )\t2\n")
    return folder


@pytest.mark.parametrize(
    ("kind", "args", "expected"),
    [
        ("missing data dir", ["task=retrieval", "task.data_dir={tmp}/no/such/dir"], ["no data at", "to fix"]),
        (
            "malformed data",
            ["task=listops", "task.data_dir={bad}"],
            ["expected the header", "nothing was cached"],
        ),
        ("impossible config", ["attention=linformer", "attention.proj_len=9999"], ["invalid configuration"]),
        (
            "unknown SDPA backend",
            ["attention=softmax", "attention.backend=fast"],
            ["unknown SDPA backend 'fast'"],
        ),
        ("no resume directory", ["resume={tmp}/nowhere"], ["no run directory at"]),
        ("resume without checkpoint", ["resume={tmp}/empty-run"], ["before its first checkpoint"]),
        ("two Hydra modes", ["-m", "task=listops", "--cfg", "job"], ["cannot be combined"]),
    ],
)
def test_user_errors_print_one_message_without_traceback(kind, args, expected, tmp_path):
    bad = _bad_listops_folder(tmp_path)
    (tmp_path / "empty-run").mkdir()
    args = [arg.format(tmp=tmp_path, bad=bad) for arg in args]
    result = run_train(["profile=cpu", "logger=none", f"hydra.run.dir={tmp_path / 'run'}", *args], tmp_path)
    _assert_user_error(result, *expected)


def test_hydra_full_error_shows_the_traceback(tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "LRA_DATA_DIR": str(tmp_path / "lra-data")}
    for args in (
        ["resume=/no/such/run"],
        ["task=retrieval", f"task.data_dir={tmp_path}/none", "logger=none"],
    ):
        result = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), "profile=cpu", f"hydra.run.dir={tmp_path}/run", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode != 0
        assert "Traceback" in result.stderr and (
            "ResumeError" in result.stderr or "MissingDataError" in result.stderr
        )


def test_bench_and_analyses_report_user_errors_without_traceback(tmp_path):
    _assert_user_error(
        _run_module(["lra.bench", "bench=smoke", "bench.dtype=float8"], tmp_path), "bench.dtype='float8'"
    )
    _assert_user_error(
        _run_module(["lra.analysis.heads", "--report-only", "--out", str(tmp_path)], tmp_path),
        "python -m lra.analysis.heads: --report-only: no rows at",
    )
    _assert_user_error(
        _run_module(["lra.analysis.maps", "--checkpoints", str(tmp_path / "x"), "--out", "m.png"], tmp_path),
        "no checkpoint at",
    )
    shown = _run_module(["lra.analysis.heads", "--report-only", "--out", str(tmp_path)], tmp_path, True)
    assert shown.returncode != 0 and "Traceback" in shown.stderr and "MissingDataError" in shown.stderr


def test_user_errors_keep_their_builtin_types_and_bugs_keep_their_traceback(capsys):
    assert isinstance(MissingDataError("x"), FileNotFoundError) and isinstance(ConfigError("x"), ValueError)

    def user_mistake():
        raise ConfigError("data.seq_len=0 must be >= 1")

    with pytest.raises(SystemExit) as exit_info:
        run_cli(user_mistake, prog="prog")
    assert exit_info.value.code == 1
    assert "prog: data.seq_len=0 must be >= 1" in capsys.readouterr().err

    def bug():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        run_cli(bug, prog="prog")


def test_notes_are_part_of_a_user_errors_message():
    error = MissingDataError("listops: no data")
    error.add_note("nothing was cached")
    assert str(error) == "listops: no data\nnothing was cached"
    assert isinstance(error, UserError)


# -- item 2: Hydra's options work before, between and after the overrides ----------------------------------

FORMS = [
    ["--cfg", "job"],
    ["--cfg", "hydra"],
    ["--cfg", "all"],
    ["--cfg=job"],
    ["--cfg", "job", "--resolve"],
    ["-c", "job", "-p", "model"],
    ["--info"],
    ["--info", "defaults-tree"],
    ["--help"],
    ["-m"],
]


@pytest.mark.parametrize("cuda", [False, True])
@pytest.mark.parametrize("position", [0, 1, 2])
@pytest.mark.parametrize("form", FORMS, ids=" ".join)
def test_options_and_overrides_in_any_order_parse_as_hydra_parses_them(form, position, cuda, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    overrides = ["task=listops", "attention=softmax"]
    argv = [*overrides[:position], *form, *overrides[position:]]
    args = get_args_parser().parse_args(cli.command_line(argv))
    profile = [] if cuda else ["profile=cpu"]
    assert args.overrides == [*overrides, *profile]
    expected_cfg = None
    for index, arg in enumerate(form):
        if arg.startswith("--cfg="):
            expected_cfg = arg.split("=", 1)[1]
        elif arg in ("--cfg", "-c"):
            expected_cfg = form[index + 1]
    assert args.cfg == expected_cfg
    assert args.help == ("--help" in form) and args.multirun == ("-m" in form)
    if "--info" in form:
        assert args.info == (form[1] if len(form) > 1 else "all")


def test_a_chosen_profile_is_kept_wherever_it_is(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cli.command_line(["--cfg", "job", "profile=official"]) == ["profile=official", "--cfg", "job"]
    assert cli.command_line(["--hydra-help"]) == ["--hydra-help"]


def test_the_option_table_matches_hydras_parser():
    takes_value, optional_value = set(), set()
    for action in get_args_parser()._actions:
        if action.nargs is None and action.option_strings:
            takes_value |= set(action.option_strings)
        elif action.nargs == "?":
            optional_value |= set(action.option_strings)
            assert set(action.choices) == cli.HYDRA_INFO_CHOICES
    assert takes_value == cli.HYDRA_VALUE_OPTIONS
    assert optional_value == cli.HYDRA_INFO_OPTIONS


@pytest.mark.parametrize(
    "argv",
    [
        ["task=listops", "--cfg", "job", "attention=taylorshift"],  # the command, options in between
        ["--info", "defaults-tree", "task=text"],
    ],
)
def test_train_py_cfg_and_info_work_with_overrides_after_them(argv, tmp_path):
    result = run_train(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unrecognized arguments" not in result.stderr
    if "--cfg" in argv:
        assert "TaylorShiftAttention" in result.stdout and "max_steps" in result.stdout
    else:
        assert "task: text" in result.stdout


# -- item 3: scratch runs write under outputs/, never into results/ ------------------------------------------


def _tree_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return digest.hexdigest()


def test_a_scratch_bench_run_writes_under_outputs_not_results(tmp_path):
    committed = ROOT / "results" / "efficiency"
    before = _tree_digest(committed)
    args = ["lra.bench", "bench=smoke", "bench.levels=[operator]", "bench.attentions=[softmax]"]
    result = _run_module(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list((tmp_path / "outputs" / "bench").glob("*/cpu/rows.jsonl"))
    assert len(rows) == 1 and (rows[0].parent / "report.md").is_file()
    assert _tree_digest(committed) == before, "a scratch bench run changed results/efficiency"


def test_the_analyses_write_under_outputs_by_default(tmp_path, monkeypatch):
    from lra.analysis import ablation, gradients, heads

    for module in (ablation, gradients, heads):
        monkeypatch.setattr(module, "REPO_ROOT", tmp_path)
    heads.main(["--smoke", "--attentions", "taylorshift", "--seq-lens", "16", "--repeats", "1"])
    gradients.main(["--smoke"])
    ablation.main(["--smoke"])
    written = {path.name for path in (tmp_path / "outputs" / "analyses").iterdir()}
    assert {"heads_cpu.md", "gradients.md", "ablation.md"} <= written
    assert not (tmp_path / "results").exists()


# -- item 5: a short banner, no config dump, no advertisement ----------------------------------------------


def test_a_run_prints_a_banner_not_the_config_and_no_tip(tmp_path):
    """A multirun with overrides before and after -m (item 2), two tiny jobs."""
    result = run_train(
        [
            "task=listops",
            "-m",
            "attention=softmax",
            "seed=0,1",
            "logger=csv",
            *tiny_listops(tmp_path),
            *TINY_MODEL,
            f"hydra.sweep.dir={tmp_path / 'multirun'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert sorted(s["seed"] for s in read_summaries(tmp_path / "multirun")) == [0, 1]
    for line in (
        "== listops / softmax (seed 0) ==",
        "Profile: cpu",
        "  attention  softmax: backend=",
        "  data ",
    ):
        assert line in result.stdout
    assert "run dir    " in result.stdout and "loggers    CSV" in result.stdout
    # No config dump: its keys never reach the console.
    for key in ("_target_", "optim:", "scheduler:", "total_steps"):
        assert key not in result.stdout
    console = result.stdout + result.stderr
    assert "Tip:" not in console and "litlogger" not in console and "LeafSpec" not in console
    assert list((tmp_path / "multirun").rglob("config_resolved.yaml"))


# -- item 6: --help lists the registry -----------------------------------------------------------------------


def test_help_lists_every_attention_task_and_profile_with_a_line_each(tmp_path):
    result = run_train(["--help", "task=text"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    for name in (*ATTENTIONS, *TASKS, *PROFILES):
        described = [line for line in lines if line.startswith(f"  {name} ") and len(line.split()) > 2]
        assert described, f"{name} has no line of its own in --help"
    for text in ("seed=", "logger=csv", "resume=", "-m ", "README.md", "HYDRA_FULL_ERROR=1", "--cfg job"):
        assert text in result.stdout


def test_catalog_reads_each_yamls_first_sentence():
    lines = cli.catalog("attention").splitlines()
    assert [line.split()[0] for line in lines] == ATTENTIONS
    softmax = next(line for line in lines if line.split()[0] == "softmax")
    assert softmax.split(None, 1)[1] == "Softmax attention through PyTorch SDPA."
    assert all(len(line) <= cli.CATALOG_WIDTH + 20 for line in lines)


# -- issue 16 item 4: the debug presets compose and run ------------------------------------------------------


def test_debug_fdr_runs_one_batch_of_each_split(tmp_path):
    result = run_train(
        [
            "task=listops",
            "attention=softmax",
            "debug=fdr",
            "logger=csv",
            *tiny_listops(tmp_path),
            *TINY_MODEL[:5],
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "fast_dev_run" in result.stdout
    (summary,) = read_summaries(tmp_path / "run")
    assert summary["status"] == "completed" and summary["global_step"] == 1
    assert "test/acc" in summary["metrics"]
