"""Pathfinder and Path-X: a generator of the official distribution, the release's on-disk layout, a reader.

Layout of one difficulty folder (e.g. ``lra_release/pathfinder32/curv_contour_length_14``):
``imgs/<batch>/sample_<i>.png`` (8-bit grayscale, ``i`` restarts at 0 in each batch) and
``metadata/<batch>.npy``, which is **plain text** despite the suffix: one line per image with 11
space-separated fields (subdir, filename, index, label, continuity, contour_length, distractor_length,
paddle_length, paddle_thickness, paddle_margin, n_paddle_contrasts). The upstream generator saves the same
rows as a binary ``.npy`` array; the reader accepts both. Pixel value = token id (0-255), row-major.

The generator follows the published distribution (spec tasks.md 4.2): two target paths of dashed paddles grow
alternately from seeds ``seed_distance`` apart near the centre, turning as ``continuity`` allows; short
distractor paths fill the rest; circular markers sit on the origin end of one target and on the far end of
the same target (label 1) or of the other (label 0). A target that runs into a dead end is redrawn, as
upstream. Consecutive paddles of a path are ``2 * margin`` apart and other paddles keep ``2 * margin`` edge
to edge, as upstream, with one addition that makes every label checkable on the pixels: a target keeps
``2 * margin + extra_clearance`` from the other target, from distractors and from markers. Every image is
then verified on its render (``markers_connected``: ink joined across gaps of up to
``2 * margin + check_slack``) and redrawn unless the check agrees with the label, so no ambiguous sample is
ever written.
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from PIL import Image
from scipy import ndimage

from data.base import LRADataModule, missing_data_error
from data.cache import ArraySplits, atomic_directory, params_key
from lra.errors import ConfigError, DataError, MissingDataError

log = logging.getLogger(__name__)

# Bump when the generator's output changes, so cached generated sets are rebuilt.
GENERATOR_VERSION = 1
DIFFICULTIES = {"easy": 6, "intermediate": 9, "hard": 14}
DIFFICULTY_DIRS = {
    "easy": "curv_baseline",
    "intermediate": "curv_contour_length_9",
    "hard": "curv_contour_length_14",
}
SPLIT_MODES = ("seeded", "contiguous")
METADATA_FIELDS = (
    "subdir",
    "filename",
    "index",
    "label",
    "continuity",
    "contour_length",
    "distractor_length",
    "paddle_length",
    "paddle_thickness",
    "paddle_margin",
    "n_paddle_contrasts",
)
NPY_MAGIC = b"\x93NUMPY"
MARKER_INTENSITY = 1.0


@dataclass(frozen=True)
class PathfinderParams:
    """Everything that shapes one generated image; lengths are in output pixels.

    ``num_distractor_snakes`` follows the released settings: at 32 px ``20 // distractor_length``, at 64
    and 128 px ``ceil(budget / (contour_length / 3))`` with budgets 22 and 35, for every difficulty.
    ``extra_clearance``, ``check_threshold`` (canvas intensity) and ``check_slack`` are ours (module
    docstring); the slack sits inside the window measured on the render: label-1 markers join at
    ``2 * margin + 0.25`` or less, label-0 markers stay apart up to ``2 * margin + 0.875`` or more.
    """

    resolution: int
    contour_length: int
    distractor_length: int
    num_distractor_snakes: int
    padding: float
    paddle_length: float
    paddle_thickness: float
    paddle_margins: tuple[float, ...]
    marker_radius: float
    seed_distance: float
    continuity: float
    snake_contrasts: tuple[float, ...]
    paddle_contrasts: tuple[float, ...]
    antialias_scale: int
    extra_clearance: float = 1.0
    check_threshold: float = 0.3
    check_slack: float = 0.5
    max_attempts: int = 5000
    distractor_trials: int = 4


# Spec tasks.md 4.2 (the hard split's values; ``budget`` sets the distractor count).
_STYLES: dict[int, dict[str, Any]] = {
    32: dict(
        padding=1,
        paddle_length=2,
        paddle_thickness=0.5,
        paddle_margins=(1,),
        marker_radius=1.5,
        seed_distance=7,
        continuity=1.0,
        snake_contrasts=(2.0,),
        paddle_contrasts=(0.75,),
        antialias_scale=2,
        budget=20,
    ),
    64: dict(
        padding=1,
        paddle_length=5,
        paddle_thickness=1,
        paddle_margins=(1,),
        marker_radius=2.5,
        seed_distance=12,
        continuity=1.8,
        snake_contrasts=(0.8,),
        paddle_contrasts=(1.0,),
        antialias_scale=2,
        budget=22,
    ),
    128: dict(
        padding=1,
        paddle_length=5,
        paddle_thickness=1.5,
        paddle_margins=(2, 3),
        marker_radius=3,
        seed_distance=20,
        continuity=1.8,
        snake_contrasts=(0.9,),
        paddle_contrasts=(1.0,),
        antialias_scale=2,
        budget=35,
    ),
}


def pathfinder_params(resolution: int = 32, difficulty: str = "hard", **overrides: Any) -> PathfinderParams:
    """The released settings for ``resolution`` (32, 64, 128) and ``difficulty`` (easy/intermediate/hard)."""
    if resolution not in _STYLES:
        raise ConfigError(f"pathfinder resolution {resolution} is not one of {sorted(_STYLES)}")
    if difficulty not in DIFFICULTIES:
        raise ConfigError(f"pathfinder difficulty {difficulty!r} is not one of {sorted(DIFFICULTIES)}")
    style = dict(_STYLES[resolution])
    budget = style.pop("budget")
    contour_length = DIFFICULTIES[difficulty]
    distractor_length = contour_length // 3
    if resolution == 32:
        num_distractors = budget // distractor_length
    else:
        num_distractors = math.ceil(budget / (contour_length / 3))
    params = dict(
        resolution=resolution,
        contour_length=contour_length,
        distractor_length=distractor_length,
        num_distractor_snakes=num_distractors,
        **style,
    )
    params.update(overrides)
    return PathfinderParams(**params)


# ------------------------------------------------------------------------------------------------------
# Geometry. Points are complex numbers x + iy in output pixels (x right, y down); a paddle is the centre-line
# segment from ``origin + a * unit`` to ``origin + b * unit`` for a unit complex direction.
# ------------------------------------------------------------------------------------------------------
TARGETS = (0, 1)  # owners of the two target paths; distractors are 2, 3, ...
MARKER = -1  # owner of the marker discs


def _distance_sq(points: np.ndarray, origin: np.ndarray, unit: np.ndarray, a: float, b: float) -> np.ndarray:
    """Squared distances ``[C, P]`` from ``points`` ``[P]`` to the segments ``origin + [a, b] * unit``
    (``origin`` and ``unit`` broadcast to ``[C]``): rotate into each segment's frame, then clamp."""
    local = (points[None, :] - origin[:, None]) * np.conj(unit)[:, None]
    beyond = np.maximum(np.maximum(a - local.real, local.real - b), 0.0)
    return beyond * beyond + local.imag * local.imag


class _Scene:
    """The paddles placed so far and the clearance rule for new ones.

    Any two paddles keep ``2 * margin`` edge to edge (centre lines ``thickness + 2 * margin`` apart), except
    consecutive paddles of one path. A target path also keeps ``extra_clearance`` more from the other target,
    from distractors and from the markers, so that no other path can join it in the pixel check. Placed
    paddles are kept as points every ``1 / 4`` pixel along their centre lines (the distances are then exact
    to a few thousandths of a pixel); a marker is one point with a radius.
    """

    def __init__(self, params: PathfinderParams, margin: float) -> None:
        self.params = params
        self.along = np.linspace(0.0, 1.0, math.ceil(params.paddle_length * 4) + 1)
        paddles = 2 * params.contour_length + params.num_distractor_snakes * params.distractor_length
        capacity = paddles * len(self.along) + 2
        self.points = np.zeros(capacity, dtype=np.complex128)
        self.point_owner = np.zeros(capacity, dtype=np.int64)
        self.point_paddle = np.zeros(capacity, dtype=np.int64)
        self.point_tight_sq = np.zeros(capacity)  # squared clearance from a point, rim included
        self.point_wide_sq = np.zeros(capacity)
        self.num_points = 0
        self.starts = np.zeros(paddles, dtype=np.complex128)
        self.ends = np.zeros(paddles, dtype=np.complex128)
        self.owner = np.zeros(paddles, dtype=np.int64)
        self.intensity = np.zeros(paddles)
        self.count = 0
        self.discs: list[tuple[float, float, float]] = []
        self.tight = params.paddle_thickness + 2 * margin
        self.wide = self.tight + params.extra_clearance
        self.low = params.padding + params.paddle_thickness / 2
        self.high = params.resolution - self.low
        # Placed points farther than this from a turning pivot cannot touch any of its candidates.
        self.horizon_sq = (params.paddle_length + margin + self.wide + params.marker_radius) ** 2

    def _append(self, points: np.ndarray, owner: int, paddle: int, radius: float) -> None:
        end = self.num_points + len(points)
        self.points[self.num_points : end] = points
        self.point_owner[self.num_points : end] = owner
        self.point_paddle[self.num_points : end] = paddle
        self.point_tight_sq[self.num_points : end] = (self.tight + radius) ** 2
        self.point_wide_sq[self.num_points : end] = (self.wide + radius) ** 2
        self.num_points = end

    def add(self, start: complex, end: complex, owner: int, intensity: float) -> int:
        index = self.count
        self.starts[index], self.ends[index] = start, end
        self.owner[index], self.intensity[index] = owner, intensity
        self._append(start + self.along * (end - start), owner, index, 0.0)
        self.count += 1
        return index

    def add_disc(self, centre: complex, radius: float) -> None:
        """A marker: later paddles keep the wide clearance from its rim."""
        self.discs.append((centre.real, centre.imag, radius))
        self._append(np.array([centre]), MARKER, -1, radius - self.params.paddle_thickness / 2)

    def paddles_of(self, owner: int) -> tuple[np.ndarray, np.ndarray]:
        mine = self.owner[: self.count] == owner
        return self.starts[: self.count][mine], self.ends[: self.count][mine]

    def snapshot(self) -> tuple[int, int]:
        return self.count, self.num_points

    def restore(self, state: tuple[int, int]) -> None:
        self.count, self.num_points = state

    def _need_sq(self, close: np.ndarray, owner: int) -> np.ndarray:
        """Squared clearances between path ``owner`` and the placed points ``close``: wide where a target
        meets another path or a marker, tight otherwise (the same path, or two distractors)."""
        other_owner = self.point_owner[close]
        if owner in TARGETS:
            return np.where(other_owner == owner, self.point_tight_sq[close], self.point_wide_sq[close])
        return np.where(other_owner < 2, self.point_wide_sq[close], self.point_tight_sq[close])

    def _inside(self, points: np.ndarray) -> np.ndarray:
        return (
            (points.real >= self.low)
            & (points.real <= self.high)
            & (points.imag >= self.low)
            & (points.imag <= self.high)
        )

    def fits(self, origins: np.ndarray, unit: complex, length: float, owner: int) -> np.ndarray:
        """Which first paddles ``origins[k] + [0, length] * unit`` of path ``owner`` fit: inside the
        window and clear of everything placed."""
        ok = self._inside(origins) & self._inside(origins + length * unit)
        if not self.num_points:
            return ok
        close = np.arange(self.num_points)
        units = np.full(origins.shape, unit)
        dist_sq = _distance_sq(self.points[close], origins, units, 0.0, length)
        return ok & (dist_sq >= self._need_sq(close, owner)).all(axis=1)

    def turns_fit(
        self, pivot: complex, units: np.ndarray, a: float, b: float, owner: int, previous: int
    ) -> np.ndarray:
        """Which next paddles ``pivot + [a, b] * units[c]`` of path ``owner`` fit; ``previous`` (the paddle
        they continue) is exempt, and only placed points within the horizon of the pivot can interfere."""
        ok = self._inside(pivot + b * units) & self._inside(pivot + a * units)
        offset = self.points[: self.num_points] - pivot
        close = np.flatnonzero(offset.real * offset.real + offset.imag * offset.imag < self.horizon_sq)
        if not len(close):
            return ok
        need_sq = self._need_sq(close, owner)
        need_sq[self.point_paddle[close] == previous] = -1.0
        local = offset[close][None, :] * np.conj(units)[:, None]
        beyond = np.maximum(np.maximum(a - local.real, local.real - b), 0.0)
        return ok & (beyond * beyond + local.imag * local.imag >= need_sq).all(axis=1)


@dataclass
class _Path:
    owner: int
    tail: complex  # the free end of the first paddle (the "origin tip")
    head: complex  # the free end of the latest paddle (the "terminal tip")
    pivot: complex  # the joint the next paddle turns around
    unit: complex  # direction of the latest paddle
    contrast: float
    last: int  # scene index of the latest paddle


class _Grower:
    """Draws paths paddle by paddle: a paddle of length L lies between ``margin`` and ``L + margin`` from
    its pivot and the next pivot is ``margin`` beyond it, so consecutive paddles are ``<= 2 * margin`` apart.
    The turn is drawn with weight ``cos(min(|turn| * continuity, pi/2)) ** 2`` among the turns that fit."""

    def __init__(
        self, params: PathfinderParams, margin: float, scene: _Scene, rng: np.random.Generator
    ) -> None:
        self.params, self.margin, self.scene, self.rng = params, margin, scene, rng
        reach = params.paddle_length + margin
        # About one render pixel of arc between neighbouring candidate heads.
        count = max(16, math.ceil(2 * math.pi * reach * params.antialias_scale))
        turns = (np.arange(count) - count // 2) * (2 * math.pi / count)
        weights = np.cos(np.minimum(np.abs(turns) * params.continuity, math.pi / 2)) ** 2
        keep = weights > 1e-6
        self.turn_units, self.turn_weights = np.exp(1j * turns[keep]), weights[keep]

    def _paddle_intensity(self, contrast: float) -> float:
        return contrast * _pick(self.rng, self.params.paddle_contrasts)

    def start(self, tail: complex, unit: complex, owner: int, contrast: float) -> _Path:
        head = tail + self.params.paddle_length * unit
        index = self.scene.add(tail, head, owner, self._paddle_intensity(contrast))
        return _Path(owner, tail, head, head + self.margin * unit, unit, contrast, index)

    def extend(self, path: _Path) -> bool:
        """Add one paddle to ``path``; False when no turn fits."""
        units = path.unit * self.turn_units
        a, b = self.margin, self.margin + self.params.paddle_length
        weights = self.turn_weights * self.scene.turns_fit(path.pivot, units, a, b, path.owner, path.last)
        total = weights.sum()
        if total <= 0:
            return False
        choice = min(
            int(np.searchsorted(np.cumsum(weights), self.rng.random() * total, side="right")),
            len(weights) - 1,
        )
        unit = complex(units[choice])
        start, end = path.pivot + a * unit, path.pivot + b * unit
        path.last = self.scene.add(start, end, path.owner, self._paddle_intensity(path.contrast))
        path.unit, path.head, path.pivot = unit, end, end + self.margin * unit
        return True


def _random_unit(rng: np.random.Generator) -> complex:
    angle = rng.uniform(-math.pi, math.pi)
    return complex(math.cos(angle), math.sin(angle))


def _pick(rng: np.random.Generator, values: Sequence[float]) -> float:
    return float(values[int(rng.integers(len(values)))]) if len(values) > 1 else float(values[0])


def _draw_targets(params: PathfinderParams, grower: _Grower, scene: _Scene) -> tuple[_Path, _Path] | None:
    """Two target paths from seeds ``seed_distance`` apart near the centre, grown alternately."""
    rng, res, distance = grower.rng, params.resolution, params.seed_distance
    low, high = 2 * distance, res - 2 * distance
    x, y = rng.uniform(low, high, size=2) if high > low else (res / 2, res / 2)
    first = complex(x, y)
    tails = (first, first + distance * _random_unit(rng))
    paths = []
    for owner, tail in enumerate(tails):
        unit = _random_unit(rng)
        if not scene.fits(np.array([tail]), unit, params.paddle_length, owner)[0]:
            return None
        paths.append(grower.start(tail, unit, owner, _pick(rng, params.snake_contrasts)))
    a, b = paths
    for _ in range(params.contour_length - 1):
        if not (grower.extend(a) and grower.extend(b)):
            return None
    return a, b


def _markers_clear(params: PathfinderParams, scene: _Scene, markers: Sequence[tuple[complex, int]]) -> bool:
    """Each marker (centre, owning target) keeps the wide clearance from the other target's paddles and
    from the other marker, rim to rim; the same rule for both labels, so rejection says nothing about them."""
    radius = params.marker_radius
    for centre, owner in markers:
        starts, ends = scene.paddles_of(1 - owner)
        length = params.paddle_length
        units = (ends - starts) / length
        dist_sq = _distance_sq(np.array([centre]), starts, units, 0.0, length)
        if dist_sq.min() < (radius + scene.wide - params.paddle_thickness / 2) ** 2:
            return False
    (first, _), (second, _) = markers
    return abs(first - second) >= 2 * radius + scene.wide - params.paddle_thickness


def _draw_distractor(params: PathfinderParams, grower: _Grower, scene: _Scene, owner: int) -> bool:
    """One short path from a uniformly drawn free place, or False after ``distractor_trials`` tries."""
    rng = grower.rng
    for _ in range(params.distractor_trials):
        unit = _random_unit(rng)
        coords = rng.uniform(params.padding, params.resolution - params.padding, size=(64, 2))
        tails = coords[:, 0] + 1j * coords[:, 1]
        fits = np.flatnonzero(scene.fits(tails, unit, params.paddle_length, owner))
        if not len(fits):
            continue
        state = scene.snapshot()
        path = grower.start(complex(tails[fits[0]]), unit, owner, _pick(rng, params.snake_contrasts))
        if all(grower.extend(path) for _ in range(params.distractor_length - 1)):
            return True
        scene.restore(state)
    return False


def paint(
    params: PathfinderParams,
    segments: np.ndarray,
    intensities: np.ndarray,
    discs: Sequence[tuple[float, float, float]],
) -> np.ndarray:
    """The antialiasing canvas: paddles and markers as box-filtered coverage at ``antialias_scale``x.

    Args:
        segments: ``[S, 4]`` paddle centre lines in output pixels; ``intensities``: ``[S]``.
        discs: ``(x, y, radius)`` markers, painted at ``MARKER_INTENSITY``.
    Returns:
        ``[res * scale, res * scale]`` float64; overlapping strokes take the maximum.
    """
    scale = params.antialias_scale
    size = params.resolution * scale
    canvas = np.zeros((size, size))
    half = params.paddle_thickness * scale / 2
    for segment, intensity in zip(segments * scale, intensities, strict=True):
        p0, p1 = segment[:2], segment[2:]
        x0, y0 = np.floor(np.minimum(p0, p1) - half - 1).astype(int).clip(0, size)
        x1, y1 = np.ceil(np.maximum(p0, p1) + half + 1).astype(int).clip(0, size)
        ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
        length = float(np.hypot(*(p1 - p0)))
        ux, uy = (p1 - p0) / length
        along = (xs - p0[0]) * ux + (ys - p0[1]) * uy
        across = np.abs((xs - p0[0]) * uy - (ys - p0[1]) * ux)
        cover = np.clip(half + 0.5 - across, 0, 1) * np.clip(np.minimum(along, length - along) + 0.5, 0, 1)
        np.maximum(canvas[y0:y1, x0:x1], intensity * cover, out=canvas[y0:y1, x0:x1])
    for x, y, radius in discs:
        cx, cy, r = x * scale, y * scale, radius * scale
        x0, y0 = max(0, int(cx - r - 1)), max(0, int(cy - r - 1))
        x1, y1 = min(size, math.ceil(cx + r + 1)), min(size, math.ceil(cy + r + 1))
        ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
        cover = np.clip(r + 0.5 - np.hypot(xs - cx, ys - cy), 0, 1)
        np.maximum(canvas[y0:y1, x0:x1], MARKER_INTENSITY * cover, out=canvas[y0:y1, x0:x1])
    return canvas


def downsample(canvas: np.ndarray, resolution: int) -> np.ndarray:
    """Lanczos to ``[resolution, resolution]``, then min-max scaling to bytes (uint8)."""
    small = Image.fromarray(canvas.astype(np.float32)).resize((resolution,) * 2, Image.Resampling.LANCZOS)
    pixels = np.clip(np.asarray(small, dtype=np.float64), 0, None)  # Lanczos rings below zero
    low, high = pixels.min(), pixels.max()
    return np.round((pixels - low) * (255.0 / max(high - low, 1e-12))).astype(np.uint8)


def _disc(radius: float) -> np.ndarray:
    reach = math.floor(radius)
    ys, xs = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    return xs * xs + ys * ys <= radius * radius


def markers_connected(
    canvas: np.ndarray, markers: Sequence[tuple[float, float]], scale: int, threshold: float, bridge: float
) -> bool:
    """Whether the two markers are joined in the rendered canvas, counting gaps up to ``bridge`` as joined.

    The canvas pixels ``>= threshold`` are grown by ``bridge / 2`` (output pixels) and labelled with
    8-connectivity; the markers are joined when their centres fall in one component.

    Args:
        canvas: ``[res * scale, res * scale]`` render before downsampling; markers: two ``(x, y)`` centres in
            output pixels.
    """
    ink = canvas >= threshold
    grown = ndimage.binary_dilation(ink, structure=_disc(bridge * scale / 2)) if bridge > 0 else ink
    labels, _ = ndimage.label(grown, structure=np.ones((3, 3)))
    (ax, ay), (bx, by) = markers
    first, second = labels[int(ay * scale), int(ax * scale)], labels[int(by * scale), int(bx * scale)]
    return bool(first) and first == second


@dataclass
class Sample:
    """One generated image and how it was made."""

    image: np.ndarray  # [res, res] uint8, as written to the PNG
    canvas: np.ndarray  # [res * antialias_scale] ** 2 float, the render before downsampling
    label: int
    markers: tuple[tuple[float, float], tuple[float, float]]  # (x, y) centres in output pixels
    margin: float
    num_distractors: int
    attempts: int = 1


def sample_seed(seed: int, params: PathfinderParams, batch: int, index: int) -> np.random.SeedSequence:
    """The seed of one image: a function of its place only, so output does not depend on worker count."""
    return np.random.SeedSequence([seed, params.resolution, params.contour_length, batch, index])


def draw_image(params: PathfinderParams, rng: np.random.Generator, label: int) -> Sample | None:
    """One attempt at an image with ``label``, not yet verified; None when the target paths did not fit
    (the caller redraws, as the upstream generator does)."""
    margin = _pick(rng, params.paddle_margins)
    scene = _Scene(params, margin)
    grower = _Grower(params, margin, scene, rng)
    targets = _draw_targets(params, grower, scene)
    if targets is None:
        return None
    origin = int(rng.integers(2))
    marked, terminal = targets[origin], targets[origin if label == 1 else 1 - origin]
    markers = ((marked.tail, marked.owner), (terminal.head, terminal.owner))
    if not _markers_clear(params, scene, markers):
        return None
    for centre, _ in markers:
        scene.add_disc(centre, params.marker_radius)
    placed = sum(
        _draw_distractor(params, grower, scene, owner=2 + i) for i in range(params.num_distractor_snakes)
    )
    segments = np.stack([scene.starts.real, scene.starts.imag, scene.ends.real, scene.ends.imag], axis=1)
    canvas = paint(params, segments[: scene.count], scene.intensity[: scene.count], scene.discs)
    centres = tuple((centre.real, centre.imag) for centre, _ in markers)
    return Sample(downsample(canvas, params.resolution), canvas, label, centres, margin, placed)


def generate_sample(params: PathfinderParams, rng: np.random.Generator) -> Sample:
    """Draw one image; redraw until the check agrees with the label (``markers_connected`` on the canvas)."""
    label = int(rng.integers(2))
    for attempt in range(1, params.max_attempts + 1):
        sample = draw_image(params, rng, label)
        if sample is None:
            continue
        joined = markers_connected(
            sample.canvas,
            sample.markers,
            params.antialias_scale,
            params.check_threshold,
            2 * sample.margin + params.check_slack,
        )
        if joined == bool(label):
            sample.attempts = attempt
            return sample
    raise RuntimeError(
        f"pathfinder generator: no valid image after {params.max_attempts} attempts at "
        f"{params.resolution}px, contour length {params.contour_length}; the settings leave "
        f"too little room (lower extra_clearance or the distractor count)"
    )


# ------------------------------------------------------------------------------------------------------
# The on-disk layout
# ------------------------------------------------------------------------------------------------------
def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def metadata_row(params: PathfinderParams, batch: int, index: int, label: int, margin: float) -> list[str]:
    """The 11 metadata fields of one image, as the release writes them."""
    return [
        f"imgs/{batch}",
        f"sample_{index}.png",
        str(index),
        str(label),
        _number(params.continuity),
        str(params.contour_length),
        str(params.distractor_length),
        _number(params.paddle_length),
        _number(params.paddle_thickness),
        _number(margin),
        str(len(params.paddle_contrasts)),
    ]


def write_metadata(path: Path, rows: Iterable[Sequence[str]]) -> None:
    """The release's text format: one space-separated line per image, newline-terminated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(" ".join(row) + "\n" for row in rows), encoding="utf-8")


def read_metadata(path: Path) -> list[list[str]]:
    """Rows of one metadata file: the release's text format, or a binary ``.npy`` array of the same rows.

    A malformed line raises naming the file and the line.
    """
    raw = path.read_bytes()
    if raw.startswith(NPY_MAGIC):
        try:
            array = np.load(path, allow_pickle=False)
        except ValueError as err:
            raise DataError(f"{path}: unreadable binary metadata ({err})") from err
        lines = [
            (row + 1, [str(value) for value in np.atleast_1d(entry)])
            for row, entry in enumerate(np.atleast_2d(array))
        ]
    else:
        lines = [
            (number, line.split())
            for number, line in enumerate(raw.decode("utf-8", errors="replace").splitlines(), start=1)
            if line.strip()
        ]
    rows = []
    for number, fields in lines:
        if len(fields) != len(METADATA_FIELDS):
            raise DataError(
                f"{path}:{number}: expected {len(METADATA_FIELDS)} space-separated fields "
                f"({' '.join(METADATA_FIELDS)}), got {len(fields)}: {' '.join(fields)!r}"
            )
        if fields[3] not in ("0", "1"):
            raise DataError(f"{path}:{number}: label (field 4) must be 0 or 1, got {fields[3]!r}")
        rows.append(fields)
    return rows


def _batch_order(path: Path) -> tuple[int, int | str]:
    return (0, int(path.stem)) if path.stem.isdigit() else (1, path.stem)


def list_examples(folder: Path, task: str = "pathfinder") -> tuple[list[Path], list[int]]:
    """Image paths and labels of one difficulty folder, in batch and line order; empty images are skipped."""
    metadata_dir = folder / "metadata"
    files = sorted(metadata_dir.glob("*.npy"), key=_batch_order) if metadata_dir.is_dir() else []
    if not files:
        raise missing_data_error(
            task,
            folder,
            "a Pathfinder difficulty folder with metadata/<batch>.npy and "
            "imgs/<batch>/sample_<i>.png (the LRA release layout)",
            "point task.data_dir at a difficulty folder such as "
            "lra_release/pathfinder32/curv_contour_length_14 (Path-X: "
            "lra_release/pathfinder128/curv_contour_length_14) from lra_release.gz "
            "(google-research/long-range-arena), or at lra_release/pathfinder32 with data.difficulty=all; "
            "or leave task.data_dir=null to generate the data with the official distribution",
        )
    paths, labels, empty = [], [], []
    for file in files:
        for fields in read_metadata(file):
            image = folder / fields[0] / fields[1]
            try:
                size = image.stat().st_size
            except FileNotFoundError:
                raise MissingDataError(
                    f"{file}: lists {fields[0]}/{fields[1]}, but {image} does not exist"
                ) from None
            if size == 0:
                empty.append(image)
                continue
            paths.append(image)
            labels.append(int(fields[3]))
    if empty:
        log.warning("pathfinder: skipped %d empty image file(s), e.g. %s", len(empty), empty[0])
    return paths, labels


def decode_png(path: Path, resolution: int) -> np.ndarray:
    """Pixel values of one 8-bit grayscale PNG, row-major ``[resolution**2]`` uint8 (= token ids)."""
    try:
        with Image.open(path) as image:
            if image.mode != "L":
                raise DataError(f"{path}: expected an 8-bit grayscale PNG (mode L), got mode {image.mode}")
            if image.size != (resolution, resolution):
                raise DataError(
                    f"{path}: expected {resolution}x{resolution} pixels, got "
                    f"{image.size[0]}x{image.size[1]}; check data.resolution"
                )
            return np.asarray(image, dtype=np.uint8).reshape(-1)
    except (OSError, SyntaxError) as err:
        # PIL reports truncation and garbage without the file name (UnidentifiedImageError is an OSError).
        raise DataError(
            f"{path}: unreadable or truncated PNG ({err}); re-extract the release, or delete "
            f"the generated folder to regenerate it"
        ) from err


def _decode_chunk(job: tuple[list[str], int]) -> np.ndarray:
    paths, resolution = job
    return np.stack([decode_png(Path(path), resolution) for path in paths])


def _pool(workers: int | None, jobs: int) -> int:
    """Processes to use: ``workers`` (None or 0: every core), never more than there are jobs."""
    return max(1, min(workers or os.cpu_count() or 1, jobs))


def decode_pngs(
    paths: Sequence[Path], resolution: int, workers: int | None = None, chunk: int = 1000
) -> np.ndarray:
    """Decode many PNGs in parallel; ``[len(paths), resolution**2]`` uint8."""
    out = np.zeros((len(paths), resolution * resolution), dtype=np.uint8)
    jobs = [([str(p) for p in paths[i : i + chunk]], resolution) for i in range(0, len(paths), chunk)]
    processes = _pool(workers, len(jobs))
    if processes == 1:
        results: Iterable[np.ndarray] = map(_decode_chunk, jobs)
        for start, block in zip(range(0, len(paths), chunk), results, strict=True):
            out[start : start + len(block)] = block
        return out
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        for start, block in zip(range(0, len(paths), chunk), pool.imap(_decode_chunk, jobs), strict=True):
            out[start : start + len(block)] = block
    return out


def _generate_chunk(job: tuple[PathfinderParams, int, int, int, int, str]) -> list[list[str]]:
    params, seed, batch, start, stop, folder = job
    image_dir = Path(folder) / "imgs" / str(batch)
    image_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(start, stop):
        sample = generate_sample(params, np.random.default_rng(sample_seed(seed, params, batch, index)))
        Image.fromarray(sample.image, mode="L").save(image_dir / f"sample_{index}.png")
        rows.append(metadata_row(params, batch, index, sample.label, sample.margin))
    return rows


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
    jobs = []
    for batch in range(math.ceil(num_images / images_per_batch)):
        size = min(images_per_batch, num_images - batch * images_per_batch)
        jobs += [
            (params, seed, batch, start, min(start + chunk, size), str(folder))
            for start in range(0, size, chunk)
        ]
    processes = _pool(workers, len(jobs))
    rows_by_batch: dict[int, list[list[str]]] = {}
    started, done, report = time.time(), 0, max(1, num_images // 20)
    with contextlib.ExitStack() as stack:
        if processes == 1:
            results: Iterable[list[list[str]]] = map(_generate_chunk, jobs)
        else:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(processes))
            results = pool.imap(_generate_chunk, jobs)
        for job, rows in zip(jobs, results, strict=True):
            rows_by_batch.setdefault(job[2], []).extend(rows)
            done += len(rows)
            if done // report != (done - len(rows)) // report or done == num_images:
                elapsed = time.time() - started
                log.info(
                    "pathfinder: %d/%d images (%.0f s, about %.0f s left)",
                    done,
                    num_images,
                    elapsed,
                    elapsed / done * (num_images - done),
                )
    for batch, rows in rows_by_batch.items():
        write_metadata(folder / "metadata" / f"{batch}.npy", rows)


def generated_pathfinder_dir(
    root: Path,
    resolution: int,
    difficulty: str,
    num_images: int,
    images_per_batch: int = 1000,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Generate (once) a difficulty folder under ``root/pathfinder/generated-<key>`` and return its path."""
    params = pathfinder_params(resolution, difficulty)
    key = params_key(
        {
            "version": GENERATOR_VERSION,
            "params": asdict(params),
            "num_images": num_images,
            "images_per_batch": images_per_batch,
            "seed": seed,
        }
    )
    base = root / "pathfinder" / f"generated-{key}"
    relative = Path(f"pathfinder{resolution}") / DIFFICULTY_DIRS[difficulty]

    def build(tmp: Path) -> None:
        log.info(
            "pathfinder: generating %d images at %dpx (%s) into %s", num_images, resolution, difficulty, base
        )
        write_pathfinder(tmp / relative, params, num_images, images_per_batch, seed, workers)
        (tmp / "PARAMS").write_text(
            repr(
                {
                    "params": asdict(params),
                    "num_images": num_images,
                    "images_per_batch": images_per_batch,
                    "seed": seed,
                }
            )
            + "\n"
        )

    return atomic_directory(base, build) / relative


# ------------------------------------------------------------------------------------------------------
# DataModules
# ------------------------------------------------------------------------------------------------------
def split_indices(num_examples: int, mode: str, seed: int) -> dict[str, np.ndarray]:
    """80/10/10 of the examples, after a seeded permutation (``seeded``) or in file order (``contiguous``)."""
    if mode not in SPLIT_MODES:
        raise ConfigError(f"data.split={mode!r} is not one of {SPLIT_MODES}")
    order = (
        np.random.default_rng(seed).permutation(num_examples) if mode == "seeded" else np.arange(num_examples)
    )
    num_train, num_val = int(0.8 * num_examples), int(0.1 * num_examples)
    return {
        "train": order[:num_train],
        "val": order[num_train : num_train + num_val],
        "test": order[num_train + num_val :],
    }


class PathfinderDataModule(LRADataModule):
    """Pathfinder from the LRA release (``data_dir``) or from our generator (cached, seeded).

    Args:
        data_dir: a release difficulty folder, e.g. ``lra_release/pathfinder32/curv_contour_length_14``
            (with ``difficulty=all``: the ``pathfinder32`` folder holding the three); ``None`` generates.
        resolution: image side (32 for Pathfinder, 128 for Path-X); ``seq_len`` must be its square.
        difficulty: ``easy`` | ``intermediate`` | ``hard`` (LRA) | ``all`` (the three together).
        num_images: images per difficulty when generating (official 200,000).
        images_per_batch: images per ``imgs/<batch>`` folder when generating.
        generator_seed: seed of the generator (independent of the training seed).
        workers: processes for generating and decoding (default: every core).
        split: ``seeded`` (a permutation by ``split_seed``, then 80/10/10) or ``contiguous`` (file order).
        **kwargs: ``LRADataModule`` arguments (seq_len, batch_size, shuffle, ...).
    """

    task_name: ClassVar[str] = "pathfinder"
    vocab_size: ClassVar[int] = 256
    num_classes: ClassVar[int] = 2
    default_resolution: ClassVar[int] = 32

    def __init__(
        self,
        data_dir: str | None = None,
        resolution: int | None = None,
        difficulty: str = "hard",
        num_images: int = 200_000,
        images_per_batch: int = 1000,
        generator_seed: int = 0,
        workers: int | None = None,
        split: str = "seeded",
        split_seed: int = 0,
        **kwargs: Any,
    ) -> None:
        resolution = resolution or self.default_resolution
        kwargs.setdefault("seq_len", resolution * resolution)
        super().__init__(**kwargs)
        if self.seq_len != resolution * resolution:
            raise ConfigError(
                f"data.seq_len={self.seq_len} does not match data.resolution={resolution} "
                f"({resolution}x{resolution} = {resolution * resolution} pixels)"
            )
        if difficulty not in (*DIFFICULTIES, "all"):
            raise ConfigError(f"data.difficulty={difficulty!r} is not one of {(*DIFFICULTIES, 'all')}")
        if split not in SPLIT_MODES:
            raise ConfigError(f"data.split={split!r} is not one of {SPLIT_MODES}")
        self.data_dir = Path(data_dir).expanduser() if data_dir else None
        self.resolution = resolution
        self.difficulty = difficulty
        self.generator = {
            "num_images": num_images,
            "images_per_batch": images_per_batch,
            "seed": generator_seed,
        }
        self.workers = workers
        self.split = split
        self.split_seed = split_seed

    @property
    def source(self) -> str:
        return "release" if self.data_dir else "generated"

    @property
    def difficulties(self) -> list[str]:
        return list(DIFFICULTIES) if self.difficulty == "all" else [self.difficulty]

    def cache_params(self) -> dict[str, Any]:
        common = {
            "resolution": self.resolution,
            "difficulty": self.difficulty,
            "split": self.split,
            "split_seed": self.split_seed,
        }
        if self.data_dir:
            return {"data_dir": str(self.data_dir.resolve()), **common}
        return {"generator": self.generator, "version": GENERATOR_VERSION, **common}

    def difficulty_dirs(self) -> list[Path]:
        """The difficulty folders to read, generating them first when ``data_dir`` is None."""
        if self.data_dir is None:
            return [
                generated_pathfinder_dir(
                    self.root, self.resolution, difficulty, workers=self.workers, **self.generator
                )
                for difficulty in self.difficulties
            ]
        if not self.data_dir.is_dir():
            raise missing_data_error(
                self.task_name,
                self.data_dir,
                "a Pathfinder difficulty folder (metadata/, imgs/)",
                f"point task.data_dir at lra_release/pathfinder{self.resolution}/curv_contour_length_14 "
                "(lra_release.gz from google-research/long-range-arena), or leave task.data_dir=null to "
                "generate the data with the official distribution",
            )
        if self.difficulty == "all":
            return [self.data_dir / DIFFICULTY_DIRS[difficulty] for difficulty in DIFFICULTIES]
        return [self.data_dir]

    def build_arrays(self) -> ArraySplits:
        paths: list[Path] = []
        labels: list[int] = []
        for folder in self.difficulty_dirs():
            folder_paths, folder_labels = list_examples(folder, self.task_name)
            paths += folder_paths
            labels += folder_labels
        label_array = np.asarray(labels, dtype=np.int64)
        splits: ArraySplits = {}
        for split, rows in split_indices(len(paths), self.split, self.split_seed).items():
            ids = decode_pngs([paths[i] for i in rows], self.resolution, self.workers)
            splits[split] = {
                "input_ids": ids,
                "lengths": np.full(len(rows), self.seq_len, dtype=np.int32),
                "labels": label_array[rows],
            }
        return splits

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "resolution": self.resolution,
            "difficulty": self.difficulty,
            "split": self.split,
        }


class PathXDataModule(PathfinderDataModule):
    """Path-X: Pathfinder at 128x128 (16,384 tokens); same layout, ``lra_release/pathfinder128/...``."""

    task_name: ClassVar[str] = "pathx"
    default_resolution: ClassVar[int] = 128


__all__ = [
    "DIFFICULTY_DIRS",
    "PathXDataModule",
    "PathfinderDataModule",
    "PathfinderParams",
    "Sample",
    "decode_png",
    "downsample",
    "draw_image",
    "generate_sample",
    "generated_pathfinder_dir",
    "list_examples",
    "markers_connected",
    "metadata_row",
    "paint",
    "pathfinder_params",
    "read_metadata",
    "sample_seed",
    "split_indices",
    "write_metadata",
    "write_pathfinder",
]
