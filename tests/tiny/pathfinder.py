"""Tiny Pathfinder: 20 generated 32x32 images in the release layout (two batch folders of 10, text metadata);
the seeded 80/10/10 cut gives 16/2/2, so evaluation batches hold 2 images."""

from pathlib import Path

from data.pathfinder import DIFFICULTY_DIRS
from data.pathfinder_generator import pathfinder_params, write_pathfinder


def write_tiny_release(tmp_path: Path, resolution: int, num_images: int) -> Path:
    """``tmp_path/pathfinder<res>/curv_contour_length_14`` with ``num_images`` images, 10 per batch."""
    folder = tmp_path / f"pathfinder{resolution}" / DIFFICULTY_DIRS["hard"]
    write_pathfinder(
        folder, pathfinder_params(resolution, "hard"), num_images, images_per_batch=10, seed=1, workers=1
    )
    return folder


def tiny_overrides(tmp_path: Path) -> list[str]:
    folder = write_tiny_release(tmp_path, 32, 20)
    return [f"task.data_dir={folder}", "data.batch_size=4", "data.eval_batch_size=2", "data.workers=1"]
