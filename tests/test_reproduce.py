"""Every committed cell is reproducible: rerunning the stored command of one gives its test accuracy again.

Slow (a whole CPU-profile ListOps run, about 4 minutes on 2 idle cores): `make test-all` runs it, CI does not.
The rerun uses the committed run's own overrides and nothing else, so it also checks that those overrides are
a complete description of the run (data order, evaluation subsample and initialisation all follow the seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT, read_summaries, run_train

RUNS = ROOT / "results" / "runs" / "cpu"
# On the machine that produced the cell the rerun is bitwise identical; another CPU (other BLAS kernels,
# other summation orders) may move a few borderline examples. Two examples of ListOps's 500 test examples.
TOLERANCE = 0.004


def _committed_listops_softmax_run() -> Path | None:
    runs = sorted(RUNS.glob("*/listops/softmax/seed0-*/summary.json"))
    return runs[-1].parent if runs else None


@pytest.mark.slow
def test_a_committed_cell_reproduces(tmp_path: Path) -> None:
    run = _committed_listops_softmax_run()
    if run is None:
        pytest.skip("no committed CPU ListOps softmax run in results/runs")
    committed = json.loads((run / "summary.json").read_text())
    overrides = yaml.safe_load((run / "overrides.yaml").read_text())
    result = run_train([*overrides, f"hydra.run.dir={tmp_path / 'rerun'}"], tmp_path, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (rerun,) = read_summaries(tmp_path / "rerun")
    assert rerun["global_step"] == committed["global_step"]
    expected, got = committed["metrics"]["test/acc"], rerun["metrics"]["test/acc"]
    assert abs(got - expected) <= TOLERANCE, f"test/acc {got:.4f} vs committed {expected:.4f} ({run})"
