"""Tiny Path-X: 10 generated 128x128 images in the release layout; the 80/10/10 cut gives 8/1/1 and one
image per evaluation batch. Each step attends over 16,384 tokens, so batches hold one image and attention
dropout is off: with dropout, CPU SDPA falls back to the math kernel and materialises 16,384^2 scores per
head (about 17 GB)."""

from pathlib import Path

from tests.tiny.pathfinder import write_tiny_release


def tiny_overrides(tmp_path: Path) -> list[str]:
    folder = write_tiny_release(tmp_path, 128, 10)
    return [
        f"task.data_dir={folder}",
        "data.batch_size=1",
        "data.eval_batch_size=1",
        "data.workers=1",
        "attn_dropout=0.0",
    ]
