"""The efficiency benchmark (lra/bench.py, lra/bench_levels.py, lra/bench_report.py): the smoke preset end to
end, an OOM that becomes a row, the crossover finder, the CPU peak-memory accounting, the sweep's failure
rows and the report's rerun command. No timing is asserted."""

import json
import math
import shlex
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from lra.bench import registered_attentions, run, variants_from_config
from lra.bench_report import rerun_command
from lra.bench_rows import OperatorTable
from lra.crossover import find_crossover
from lra.summary import REPO_ROOT
from lra.timing import Sweep, TimeCap, peak_memory_mb
from models.attention.linformer import LinformerAttention

CONF = Path(__file__).resolve().parents[1] / "conf"
OOM_LENGTH = 32
ENV_FIELDS = ("device", "device_name", "torch", "triton", "git_commit", "threads")
ROW_FIELDS = (
    "attention",
    "variant",
    "label",
    "dtype",
    "causal",
    "masked",
    "batch",
    "heads",
    "seq_len",
    "head_dim",
    "sdpa_default",
    "oom",
    "skipped",
    "error",
)
MEASURED_FIELDS = (
    "fwd_ms",
    "fwd_ms_iqr",
    "fwd_bwd_ms",
    "fwd_bwd_ms_iqr",
    "peak_mb",
    "flops",
    "fwd_gflops",
    "fwd_bwd_gflops",
    "softmax_equiv_fwd_gflops",
    "gate_err",
)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One in-process `bench=smoke` run in which Linformer runs out of memory at N = 32 (operator level)."""
    out = tmp_path_factory.mktemp("bench")
    real_attend = LinformerAttention.attend

    def attend_or_oom(self, q, k, v, mask):
        if q.shape[2] == OOM_LENGTH:
            raise torch.OutOfMemoryError("simulated: tried to allocate 1 EiB")
        return real_attend(self, q, k, v, mask)

    with pytest.MonkeyPatch.context() as patch, initialize_config_dir(str(CONF), version_base="1.3"):
        patch.setattr(LinformerAttention, "attend", attend_or_oom)
        cfg = compose("bench", overrides=["bench=smoke", f"output_dir={out}", "label=smoke"])
        folder = run(cfg)
    rows = [json.loads(line) for line in (folder / "rows.jsonl").read_text().splitlines()]
    return cfg, folder, rows


def test_one_row_per_variant_and_shape(smoke):
    cfg, _, rows = smoke
    labels = [variant.label for variant in variants_from_config(cfg.bench.variants, registered_attentions())]
    grid = cfg.bench.operator_level
    operator = [row for row in rows if row["kind"] == "operator"]
    expected = {(label, n, d) for label in labels for n in grid.seq_len for d in grid.head_dim}
    assert sorted((r["label"], r["seq_len"], r["head_dim"]) for r in operator) == sorted(expected)
    for row in operator:
        missing = [key for key in (*ENV_FIELDS, *ROW_FIELDS) if key not in row]
        assert not missing, f"{row['label']} N={row['seq_len']} lacks {missing}"
    measured = [row for row in operator if not row["skipped"] and not row["error"]]
    assert {row["attention"] for row in measured} == set(registered_attentions())
    for row in measured:
        missing = [key for key in MEASURED_FIELDS if key not in row]
        assert not missing, f"{row['label']} lacks {missing}"
        assert row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 and row["peak_mb"] > 0 and row["flops"] > 0
        assert row["repeats"] >= 3 and row["gate_ok"] is True, row
    assert any(row["kind"] == "calibration" for row in rows) and rows[0]["kind"] == "run"


def test_materialised_methods_stop_at_max_n_quadratic(smoke):
    cfg, _, rows = smoke
    limit = cfg.bench.operator_level.max_n_quadratic
    for row in rows:
        if row["kind"] == "operator" and row["quadratic"] and row["seq_len"] > limit:
            assert "max_n_quadratic" in row["skipped"] and row.get("fwd_ms") is None


def test_out_of_memory_is_a_row_and_the_sweep_goes_on(smoke):
    _, _, rows = smoke
    oom = [row for row in rows if row["kind"] == "operator" and row["oom"]]
    assert [(row["attention"], row["seq_len"]) for row in oom] == [("linformer", OOM_LENGTH)]
    assert "OutOfMemoryError" in oom[0]["error"] and oom[0].get("fwd_ms") is None
    after = [
        row for row in rows if row["kind"] == "operator" and row["seq_len"] == OOM_LENGTH and not row["oom"]
    ]
    assert any(row.get("fwd_ms") for row in after)


def test_model_level_rows(smoke):
    cfg, _, rows = smoke
    model = [row for row in rows if row["kind"] == "model"]
    level = cfg.bench.model_level
    assert len(model) == len(level.seq_len) * len({row["label"] for row in model})
    assert {row["attention"] for row in model} == set(registered_attentions())
    for row in model:
        assert row["steps_per_s"] > 0 and row["peak_mb"] > 0 and row["batch"] == level.batch_size


def test_report_and_plots(smoke):
    _, folder, _ = smoke
    report = (folder / "report.md").read_text()
    for heading in (
        "## Environment",
        "## TaylorShift: efficient against direct",
        "N0 (theory)",
        "N1 (theory)",
        "## Where each attention overtakes softmax",
        "## Model level",
        "OOM",
    ):
        assert heading in report
    for name in ("time_vs_n.png", "memory_vs_n.png"):
        with Image.open(folder / name) as image:
            assert image.format == "PNG" and min(image.size) > 100
            image.verify()


def test_find_crossover_interpolates_in_log_log():
    ns = [256, 512, 1024, 2048]
    # The ratio candidate/reference is 4, 2, 1/2, 1/4: it crosses 1 halfway between 512 and 1024.
    found = find_crossover(ns, [4.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 4.0])
    assert found.status == "crossed" and found.n == 1024
    assert found.n_interp == pytest.approx(math.sqrt(512 * 1024))
    assert found.text() == "1,024 (≈724)"


@pytest.mark.parametrize(
    ("candidate", "reference", "status", "n", "interpolated"),
    [
        ([1.0, 1.0, 1.0], [2.0, 2.0, 2.0], "always", 256, False),
        ([3.0, 3.0, 3.0], [2.0, 2.0, 2.0], "never", None, False),
        # A win that does not last is not a crossover: the last crossing counts.
        ([1.0, 3.0, 1.0], [2.0, 2.0, 2.0], "crossed", 1024, True),
        # The reference ran out of memory at 1024: the candidate wins there, with nothing to interpolate.
        ([3.0, 3.0, 3.0], [2.0, 2.0, math.inf], "crossed", 1024, False),
        # Points that were not measured (None) are left out.
        ([3.0, None, 1.0], [2.0, 2.0, None], "never", None, False),
        ([None, None, None], [1.0, 1.0, 1.0], "unknown", None, False),
    ],
)
def test_find_crossover_cases(candidate, reference, status, n, interpolated):
    found = find_crossover([256, 512, 1024], candidate, reference)
    assert (found.status, found.n, found.n_interp is not None) == (status, n, interpolated)
    if status == "never":
        assert found.text().startswith("> ")


def _row(label, n, fwd, peak, oom=False, **extra):
    return {
        "kind": "operator",
        "label": label,
        "attention": label.split()[0],
        "seq_len": n,
        "head_dim": 64,
        "dtype": "float32",
        "batch": 1,
        "heads": 1,
        "causal": False,
        "masked": False,
        "fwd_ms": fwd,
        "fwd_bwd_ms": None if fwd is None else 3 * fwd,
        "peak_mb": peak,
        "oom": oom,
        "skipped": None,
        "error": None,
        **extra,
    }


def test_operator_table_crossovers_on_synthetic_rows():
    ns = [1024, 2048, 4096, 8192]
    rows = [_row("taylorshift mode=direct", n, fwd=n * n / 1e6, peak=n * n / 1e5) for n in ns[:3]]
    rows.append(_row("taylorshift mode=direct", 8192, fwd=None, peak=None, oom=True))
    rows += [_row("taylorshift mode=efficient", n, fwd=4 * n / 1e3, peak=n / 1e2) for n in ns]
    table = OperatorTable(rows)
    setting = table.settings[0]
    time_cross = table.crossover(
        setting, 64, "taylorshift mode=efficient", "taylorshift mode=direct", "fwd_ms"
    )
    # 4N/1e3 < N²/1e6 from N > 4000 (the ratio is a power law, so the log-log interpolation is exact); the
    # direct mode's OOM at 8192 counts as a win of the efficient mode.
    assert (time_cross.status, time_cross.n) == ("crossed", 4096)
    assert time_cross.n_interp == pytest.approx(4000)
    memory = table.crossover(setting, 64, "taylorshift mode=efficient", "taylorshift mode=direct", "peak_mb")
    assert memory.status == "always"  # N/100 < N²/1e5 for N > 1000
    gate_failed = [_row("x", n, fwd=1.0, peak=1.0, gate_ok=False) for n in ns]
    assert OperatorTable(rows + gate_failed).series(setting, 64, "x", "fwd_ms")[1] == [None] * 4


def test_time_cap_predicts_from_the_measured_growth():
    cap = TimeCap(budget_s=10.0)
    assert cap.skip_reason(("a",), 1024) is None
    cap.record(("a",), 1024, 1.0)
    cap.record(("a",), 2048, 2.0)  # linear growth: 4 s at 4096, 8 s at 8192
    assert cap.skip_reason(("a",), 8192) is None
    assert "time cap" in cap.skip_reason(("a",), 16384)


def test_cpu_peak_memory_counts_live_tensor_bytes():
    def allocate():
        first = torch.ones(1 << 20)  # 4 MiB
        second = first * 2  # 8 MiB live
        del first
        return second.sum()

    cpu = torch.device("cpu")
    # A tensor allocated under one measurement and freed outside any must not leak into the next one.
    kept = []
    peak_memory_mb(lambda: kept.append(torch.ones(1 << 20)), cpu)
    kept.clear()
    assert peak_memory_mb(allocate, cpu) == pytest.approx(8.0, abs=0.1)
    assert peak_memory_mb(lambda: None, cpu) == 0.0


def test_variants_come_from_the_registry_and_the_preset():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("bench", overrides=["bench=default"])
    variants = variants_from_config(cfg.bench.variants, registered_attentions())
    names = {path.stem for path in (CONF / "attention").glob("*.yaml")}
    assert {variant.attention for variant in variants} == names
    direct = next(v for v in variants if v.label == "taylorshift mode=direct")
    assert direct.quadratic and direct.overrides == {"mode": "direct"}
    with pytest.raises(ValueError, match="no conf/attention"):
        variants_from_config({"nonexistent": [{}]}, registered_attentions())


def test_sweep_turns_failures_into_rows_and_skips_after_out_of_memory():
    sweep = Sweep(torch.device("cpu"), point_budget_s=600, timed_key="ms")

    def fail(error):
        def measure():
            raise error

        return measure

    broken = sweep.point({}, ("a",), 16, fail(ValueError("bad shape\nmore lines")))
    assert broken["error"] == "ValueError: bad shape" and broken["oom"] is False and broken["wall_s"] >= 0
    assert sweep.point({}, ("a",), 32, lambda: {"ms": 1.0})["ms"] == 1.0  # an error does not stop the series
    oom = sweep.point({}, ("b",), 16, fail(RuntimeError("DefaultCPUAllocator: can't allocate memory")))
    assert oom["oom"] is True and oom["error"].startswith("RuntimeError")
    after = sweep.point({}, ("b",), 32, lambda: {"ms": 1.0})
    assert after["oom"] is True and after["skipped"] == "out of memory at N=16" and "ms" not in after
    assert sweep.point({}, ("c",), 16, lambda: {"ms": 1.0}, skip="not causal")["skipped"] == "not causal"


@pytest.mark.parametrize("folder", sorted(p.name for p in (REPO_ROOT / "results" / "efficiency").iterdir()))
def test_rerun_command_reproduces_the_committed_runs_config(folder):
    out_dir = REPO_ROOT / "results" / "efficiency" / folder
    recorded = json.loads((out_dir / "rows.jsonl").read_text().splitlines()[0])
    command = shlex.split(rerun_command(recorded, out_dir))
    assert command[:2] == ["make", "bench"] and command[2].startswith("ARGS=")
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("bench", overrides=shlex.split(command[2].removeprefix("ARGS=")))
    assert OmegaConf.to_container(cfg.bench, resolve=True) == recorded["config"]
    assert Path(cfg.output_dir) / (cfg.label or "cpu") == out_dir.relative_to(REPO_ROOT)
