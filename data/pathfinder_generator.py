"""The Pathfinder generator: seeded, verified images, written as a release-layout folder (data/pathfinder.py).

It follows the distribution of Linsley et al. (2018, NeurIPS, arXiv 1805.08315) with the settings LRA
released (Tay et al. 2021, arXiv 2011.04006): two target paths of dashed paddles grow alternately from seeds
``seed_distance`` apart near the centre, turning as ``continuity`` allows; short distractor paths fill the
rest; circular markers sit on the origin end of one target and on the far end of the same target (label 1)
or of the other (label 0). A target that runs into a dead end is redrawn, as upstream. Consecutive paddles of
a path are ``2 * margin`` apart and other paddles keep ``2 * margin`` edge to edge, as upstream, with one
addition that makes every label checkable on the pixels: a target keeps ``2 * margin + extra_clearance`` from
the other target, from distractors and from markers. Every image is then verified on its render
(``markers_connected``: ink joined across gaps of up to ``2 * margin + check_slack``) and redrawn unless the
check agrees with the label, so no ambiguous sample is ever written.
"""

from __future__ import annotations

import logging
import math
import time
from collections import namedtuple
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data.base import map_in_processes
from data.cache import atomic_directory, params_key
from data.pathfinder import DIFFICULTIES, DIFFICULTY_DIRS, write_metadata
from data.pathfinder_canvas import (
    PaddlePath,
    PathfinderParams,
    Scene,
    distance_sq,
    downsample,
    markers_connected,
    paint,
    pick,
    random_unit,
)
from lra.errors import ConfigError

log = logging.getLogger(__name__)

# Bump when the generator's output changes, so cached generated sets are rebuilt.
GENERATOR_VERSION = 1

# The released settings of the hard split at each resolution; ``budget`` sets the distractor count. Every
# resolution also uses padding 1 and 2x antialiasing.
_Style = namedtuple(
    "_Style",
    "paddle_length paddle_thickness paddle_margins marker_radius seed_distance continuity snake_contrasts "
    "paddle_contrasts budget",
)
_STYLES = {
    32: _Style(2, 0.5, (1,), 1.5, 7, 1.0, (2.0,), (0.75,), 20),
    64: _Style(5, 1, (1,), 2.5, 12, 1.8, (0.8,), (1.0,), 22),
    128: _Style(5, 1.5, (2, 3), 3, 20, 1.8, (0.9,), (1.0,), 35),
}


def pathfinder_params(resolution: int = 32, difficulty: str = "hard", **overrides: Any) -> PathfinderParams:
    """The released settings for ``resolution`` (32, 64, 128) and ``difficulty`` (easy/intermediate/hard)."""
    if resolution not in _STYLES:
        raise ConfigError(f"pathfinder resolution {resolution} is not one of {sorted(_STYLES)}")
    style = _STYLES[resolution]._asdict()
    budget = style.pop("budget")
    length = DIFFICULTIES[difficulty]
    distractors = budget // (length // 3) if resolution == 32 else math.ceil(budget / (length / 3))
    params = dict(
        resolution=resolution,
        contour_length=length,
        distractor_length=length // 3,
        num_distractor_snakes=distractors,
        padding=1,
        antialias_scale=2,
        **style,
    )
    return PathfinderParams(**(params | overrides))


def _draw_targets(params: PathfinderParams, scene: Scene) -> tuple[PaddlePath, PaddlePath] | None:
    """Two target paths from seeds ``seed_distance`` apart near the centre, grown alternately."""
    rng, res, distance = scene.rng, params.resolution, params.seed_distance
    low, high = 2 * distance, res - 2 * distance
    x, y = rng.uniform(low, high, size=2) if high > low else (res / 2, res / 2)
    first = complex(x, y)
    tails = (first, first + distance * random_unit(rng))
    paths = []
    for owner, tail in enumerate(tails):
        unit = random_unit(rng)
        if not scene.fits(np.array([tail]), unit, params.paddle_length, owner)[0]:
            return None
        paths.append(scene.start(tail, unit, owner, pick(rng, params.snake_contrasts)))
    a, b = paths
    for _ in range(params.contour_length - 1):
        if not (scene.extend(a) and scene.extend(b)):
            return None
    return a, b


def _markers_clear(params: PathfinderParams, scene: Scene, markers: Sequence[tuple[complex, int]]) -> bool:
    """Each marker (centre, owning target) keeps the wide clearance from the other target's paddles and
    from the other marker, rim to rim; the same rule for both labels, so rejection says nothing about them."""
    radius = params.marker_radius
    for centre, owner in markers:
        starts, ends = scene.paddles_of(1 - owner)
        length = params.paddle_length
        units = (ends - starts) / length
        dist_sq = distance_sq(np.array([centre]), starts, units, 0.0, length)
        if dist_sq.min() < (radius + scene.wide - params.paddle_thickness / 2) ** 2:
            return False
    (first, _), (second, _) = markers
    return abs(first - second) >= 2 * radius + scene.wide - params.paddle_thickness


def _draw_distractor(params: PathfinderParams, scene: Scene, owner: int) -> bool:
    """One short path from a uniformly drawn free place, or False after ``distractor_trials`` tries."""
    rng = scene.rng
    for _ in range(params.distractor_trials):
        unit = random_unit(rng)
        coords = rng.uniform(params.padding, params.resolution - params.padding, size=(64, 2))
        tails = coords[:, 0] + 1j * coords[:, 1]
        fits = np.flatnonzero(scene.fits(tails, unit, params.paddle_length, owner))
        if not len(fits):
            continue
        state = scene.snapshot()
        path = scene.start(complex(tails[fits[0]]), unit, owner, pick(rng, params.snake_contrasts))
        if all(scene.extend(path) for _ in range(params.distractor_length - 1)):
            return True
        scene.restore(state)
    return False


@dataclass
class Sample:
    """One generated image and how it was made."""

    image: np.ndarray  # [res, res] uint8, as written to the PNG
    canvas: np.ndarray  # [res * antialias_scale] ** 2 float, the render before downsampling
    label: int
    markers: tuple[tuple[float, float], tuple[float, float]]  # (x, y) centres in output pixels
    margin: float


def sample_seed(seed: int, params: PathfinderParams, batch: int, index: int) -> np.random.SeedSequence:
    """The seed of one image: a function of its place only, so output does not depend on worker count."""
    return np.random.SeedSequence([seed, params.resolution, params.contour_length, batch, index])


def draw_image(params: PathfinderParams, rng: np.random.Generator, label: int) -> Sample | None:
    """One attempt at an image with ``label``, not yet verified; None when the target paths did not fit
    (the caller redraws, as the upstream generator does)."""
    margin = pick(rng, params.paddle_margins)
    scene = Scene(params, margin, rng)
    targets = _draw_targets(params, scene)
    if targets is None:
        return None
    origin = int(rng.integers(2))
    marked, terminal = targets[origin], targets[origin if label == 1 else 1 - origin]
    markers = ((marked.tail, marked.owner), (terminal.head, terminal.owner))
    if not _markers_clear(params, scene, markers):
        return None
    for centre, _ in markers:
        scene.add_disc(centre, params.marker_radius)
    for owner in range(2, 2 + params.num_distractor_snakes):
        _draw_distractor(params, scene, owner)
    canvas = paint(scene)
    centres = tuple((centre.real, centre.imag) for centre, _ in markers)
    return Sample(downsample(canvas, params.resolution), canvas, label, centres, margin)


def generate_sample(params: PathfinderParams, rng: np.random.Generator) -> Sample:
    """Draw one image; redraw until the check agrees with the label (``markers_connected`` on the canvas)."""
    label = int(rng.integers(2))
    for _ in range(params.max_attempts):
        sample = draw_image(params, rng, label)
        if sample and markers_connected(params, sample.canvas, sample.markers, sample.margin) == bool(label):
            return sample
    raise RuntimeError(
        f"pathfinder generator: no valid image after {params.max_attempts} attempts at "
        f"{params.resolution}px, contour length {params.contour_length}; the settings leave "
        f"too little room (lower extra_clearance or the distractor count)"
    )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def metadata_row(params: PathfinderParams, batch: int, index: int, label: int, margin: float) -> list[str]:
    """The 11 metadata fields of one image, as the release writes them."""
    numbers = [params.continuity, params.contour_length, params.distractor_length, params.paddle_length]
    numbers += [params.paddle_thickness, margin, len(params.paddle_contrasts)]
    return [f"imgs/{batch}", f"sample_{index}.png", str(index), str(label), *map(_number, numbers)]


def _generate_image(job: tuple[PathfinderParams, int, int, int, str]) -> list[str]:
    params, seed, batch, index, folder = job
    image_dir = Path(folder) / "imgs" / str(batch)
    image_dir.mkdir(parents=True, exist_ok=True)
    sample = generate_sample(params, np.random.default_rng(sample_seed(seed, params, batch, index)))
    Image.fromarray(sample.image, mode="L").save(image_dir / f"sample_{index}.png")
    return metadata_row(params, batch, index, sample.label, sample.margin)


def write_pathfinder(
    folder: Path,
    params: PathfinderParams,
    num_images: int,
    images_per_batch: int = 1000,
    seed: int = 0,
    workers: int | None = None,
    chunk: int = 50,
) -> None:
    """Generate ``num_images`` images into ``folder`` (one difficulty folder) in the release layout.

    Each image's random stream comes from ``(seed, resolution, contour_length, batch, index)``, so the
    files are byte-identical whatever ``workers`` is.
    """
    if num_images <= 0 or images_per_batch <= 0:
        raise ValueError(
            f"num_images ({num_images}) and images_per_batch ({images_per_batch}) must be positive"
        )
    jobs = [(params, seed, *divmod(i, images_per_batch), str(folder)) for i in range(num_images)]
    rows: list[list[str]] = []
    started, report = time.time(), max(1, num_images // 20)
    for done, row in enumerate(map_in_processes(_generate_image, jobs, workers, chunk), 1):
        rows.append(row)
        if done % report == 0 or done == num_images:
            elapsed = time.time() - started
            left = elapsed / done * (num_images - done)
            log.info("pathfinder: %d/%d images (%.0f s, about %.0f s left)", done, num_images, elapsed, left)
    for batch, start in enumerate(range(0, num_images, images_per_batch)):
        write_metadata(folder / "metadata" / f"{batch}.npy", rows[start : start + images_per_batch])


def generated_pathfinder_dir(
    root: Path, resolution: int, difficulty: str, workers: int | None, **generator: int
) -> Path:
    """Generate (once) a difficulty folder under ``root/pathfinder/generated-<key>`` and return its path;
    ``generator``: the ``num_images``, ``images_per_batch`` and ``seed`` of ``write_pathfinder``."""
    params = pathfinder_params(resolution, difficulty)
    settings = {"params": asdict(params), **generator}
    base = root / "pathfinder" / f"generated-{params_key({'version': GENERATOR_VERSION, **settings})}"
    relative = Path(f"pathfinder{resolution}") / DIFFICULTY_DIRS[difficulty]

    def build(tmp: Path) -> None:
        count = generator["num_images"]
        log.info("pathfinder: generating %d images at %dpx (%s) into %s", count, resolution, difficulty, base)
        write_pathfinder(tmp / relative, params, workers=workers, **generator)
        (tmp / "PARAMS").write_text(repr(settings) + "\n")

    return atomic_directory(base, build) / relative
