"""TaylorShift side by side with the official code (github.com/tobna/TaylorShift, Nauen et al. 2024).

    python -m lra.official_peer /path/to/TaylorShift [--seq-len 8192 --head-dim 32 --heads 4 --batch 1]
        [--out results/official_peer/cpu]

Times forward+backward of the official ``_efficient_attention`` and ``_direct_attention`` beside this
project's ``taylorshift`` (``mode=efficient`` and ``mode=direct``) on the same inputs, interleaved in one
process (median of the repeats after a warm-up). The official file is loaded from your clone, never copied;
its timm, ``vit`` and ``utils`` imports (only its ViT classes use them) get empty stand-ins. Both compute the
same function unmasked (checked before timing): the official efficient path with ``output_normalized=True``
(this project's √(N/d) output scale), its direct path without, as that one scales V in place, which
autograd refuses on a leaf.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from data.cache import atomic_write_text
from lra.bench import environment
from lra.errors import ConfigError, run_cli
from lra.markdown import md_table
from lra.registry import attention_factory
from lra.timing import median_iqr, time_calls


def load_official(clone: Path) -> types.ModuleType:
    """``taylor_shift.py`` of a clone of tobna/TaylorShift (or that file itself)."""
    path = clone / "taylor_shift.py" if clone.is_dir() else clone
    if not path.is_file():
        raise ConfigError(
            f"no official TaylorShift code at {path}; clone it with "
            "`git clone https://github.com/tobna/TaylorShift` and pass the folder"
        )
    stand_ins = {
        "timm": {},
        "timm.models": {},
        "timm.models.vision_transformer": {"Block": nn.Module},
        "vit": {"TimmViT": nn.Module},
        "utils": {"list_flatten": lambda nested: [x for part in nested for x in part]},
    }
    added = [name for name in stand_ins if name not in sys.modules]
    for name in added:
        sys.modules[name] = types.ModuleType(name)
        vars(sys.modules[name]).update(stand_ins[name])
    try:
        spec = importlib.util.spec_from_file_location("official_taylor_shift", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:  # only the import needs them; nothing else in this process should find a fake timm
        for name in added:
            del sys.modules[name]
    return module


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    official = load_official(Path(args.clone))
    shape = (args.batch, args.heads, args.seq_len, args.head_dim)
    torch.manual_seed(0)
    q, k, v, dout = (torch.randn(shape) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]

    calls = {}
    for mode in ("efficient",) if args.skip_direct else ("efficient", "direct"):
        peer = official.TaylorShiftAttention(
            args.heads * args.head_dim, num_heads=args.heads, output_normalized=mode == "efficient"
        )
        calls[f"official {mode}"] = getattr(peer, f"_{mode}_attention")
        ours = attention_factory("taylorshift", {"mode": mode})(args.heads, args.head_dim, args.seq_len)
        calls[f"project {mode}"] = ours

    def fwd_bwd(call: Any) -> Any:
        for leaf in leaves:
            leaf.grad = None
        out = call(q, k, v)
        out.backward(dout)
        return out

    cpu = torch.device("cpu")
    reference = fwd_bwd(calls["project efficient"]).detach()
    for name, call in calls.items():
        for _ in range(args.warmup):
            out = fwd_bwd(call)
        # Every path but the official direct one carries the √(N/d) output scale.
        expected = reference / ((args.seq_len / args.head_dim) ** 0.5 if name == "official direct" else 1)
        error = ((out.detach() - expected).abs().max() / expected.abs().max()).item()
        if error > 1e-3:
            raise ConfigError(
                f"{name} differs from the project's efficient output by {error:.2e} (relative) on the same "
                f"inputs, so timing them side by side would compare different functions; check that the "
                f"clone's TaylorShiftAttention is the released one (a=0.5, b=1, c=1, normalize_input=True)"
            )
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):  # interleaved, so that drifts of a shared machine hit every method alike
        for name, call in calls.items():
            times[name] += time_calls(lambda call=call: fwd_bwd(call), cpu, 1)
    env = {**environment(cpu), "load1": os.getloadavg()[0]}
    medians = {name: [round(x, 2) for x in median_iqr(measured)] for name, measured in times.items()}
    sizes = {"batch": args.batch, "heads": args.heads, "seq_len": args.seq_len, "head_dim": args.head_dim}
    rows = []
    for name, (median, iqr) in medians.items():
        peer_median = medians[name.replace("project", "official")][0]
        ratio = None if name.startswith("official") else round(median / peer_median, 3)
        row = {"method": name, **sizes, "dtype": "float32", "fwd_bwd_ms": median, "fwd_bwd_iqr_ms": iqr}
        rows.append(row | {"repeats": args.repeats, **env, "vs_official": ratio})
    return rows


def report(rows: list[dict[str, Any]], command: str) -> str:
    first = rows[0]
    lines = [
        "# TaylorShift against the official code (fwd+bwd)",
        "",
        f"`{command}` (`lra/official_peer.py`: what is compared and how). Raw rows: `rows.json`.",
        "",
        f"- device: {first['device_name']}, {first['threads']} torch threads; torch {first['torch']}, "
        f"python {first['python']}; git commit `{first['git_commit']}`; 1-minute load at the end "
        f"{first['load1']:.2f}",
        f"- shape: B={first['batch']}, h={first['heads']}, N={first['seq_len']}, d={first['head_dim']}, "
        f"float32, unmasked; median of {first['repeats']} interleaved calls after warm-up",
        "",
    ]
    body = [
        [
            row["method"],
            f"{row['fwd_bwd_ms']:.1f} (± {row['fwd_bwd_iqr_ms']:.1f})",
            "" if row["vs_official"] is None else f"{row['vs_official']:.2f}×",
        ]
        for row in rows
    ]
    return "\n".join(lines + md_table(["method", "fwd+bwd ms (± IQR)", "time ÷ official"], body))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lra.official_peer", description=__doc__.split("\n")[0])
    parser.add_argument("clone", help="a clone of github.com/tobna/TaylorShift (or its taylor_shift.py)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-direct", action="store_true", help="time the efficient paths only")
    parser.add_argument("--out", help="folder for rows.json and report.md (default: print only)")
    args = parser.parse_args(argv)
    rows = measure(args)
    # The clone's path is this machine's: the report shows where it goes instead.
    given = [("<clone of tobna/TaylorShift>" if a == args.clone else a) for a in (argv or sys.argv[1:])]
    text = report(rows, "python -m lra.official_peer " + " ".join(given))
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "rows.json", json.dumps(rows, indent=1) + "\n")
        atomic_write_text(out / "report.md", text)


if __name__ == "__main__":
    run_cli(main, prog="python -m lra.official_peer")
