"""lra.official_peer: the official TaylorShift file is loaded from a clone (its ViT imports stood in for),
checked against this project's output, timed, and reported."""

from __future__ import annotations

import json

import pytest

from lra.errors import ConfigError
from lra.official_peer import load_official, main

# A stand-in for the official taylor_shift.py: its imports and its module interface (the two private paths),
# computing the function through this project's reference, so the wiring is tested without the real file.
STAND_IN = """
from timm.models.vision_transformer import Block
from vit import TimmViT
from utils import list_flatten
import torch
from torch import nn
from models.attention.taylorshift import taylorshift_attention_ref


class TaylorShiftAttention(nn.Module):
    def __init__(self, dim, num_heads=8, output_normalized=False):
        super().__init__()
        self.num_heads, self.output_normalized = num_heads, output_normalized

    def _efficient_attention(self, q, k, v):
        tau = torch.ones(self.num_heads)
        return taylorshift_attention_ref(q, k, v, tau, output_norm=self.output_normalized)

    def _direct_attention(self, q, k, v):
        return self._efficient_attention(q, k, v)
"""


def test_a_missing_clone_says_where_to_get_it(tmp_path):
    with pytest.raises(ConfigError, match="git clone https://github.com/tobna/TaylorShift"):
        load_official(tmp_path / "nowhere")


def test_the_peer_is_checked_timed_and_reported(tmp_path, capsys):
    clone = tmp_path / "TaylorShift"
    clone.mkdir()
    (clone / "taylor_shift.py").write_text(STAND_IN)
    out = tmp_path / "out"
    sizes = ["--seq-len", "40", "--head-dim", "4", "--heads", "2", "--repeats", "2"]
    main([str(clone), *sizes, "--out", str(out)])
    rows = {row["method"]: row for row in json.loads((out / "rows.json").read_text())}
    assert set(rows) == {"official efficient", "project efficient", "official direct", "project direct"}
    assert rows["official efficient"]["vs_official"] is None
    project = rows["project efficient"]
    assert project["vs_official"] == pytest.approx(
        project["fwd_bwd_ms"] / rows["official efficient"]["fwd_bwd_ms"], rel=0.02
    )
    report = (out / "report.md").read_text()
    assert "<clone of tobna/TaylorShift>" in report and str(clone) not in report
    assert "| project efficient |" in report and report in capsys.readouterr().out


def test_a_clone_computing_another_function_is_refused_before_timing(tmp_path):
    clone = tmp_path / "TaylorShift"
    clone.mkdir()
    different = STAND_IN.replace("return self._efficient_attention(q, k, v)", "return 2 * q")
    (clone / "taylor_shift.py").write_text(different)
    sizes = ["--seq-len", "40", "--head-dim", "4", "--heads", "2", "--repeats", "1"]
    with pytest.raises(ConfigError, match="official direct differs .* released one"):
        main([str(clone), *sizes])
