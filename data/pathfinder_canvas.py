"""The canvas of one Pathfinder image: where paddles may go, how paths grow, and how the scene becomes pixels.

Points are complex numbers ``x + iy`` in output pixels (x right, y down). A paddle is the centre-line segment
from ``origin + a * unit`` to ``origin + b * unit`` for a unit complex direction. The generator
(``data/pathfinder_generator.py``) decides what to draw; this module holds the clearance rules, the growth of
paths, the antialiased render and the connectivity check that verifies each label on the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

TARGETS = (0, 1)  # owners of the two target paths; distractors are 2, 3, ...
MARKER = -1  # owner of the marker discs
MARKER_INTENSITY = 1.0


@dataclass(frozen=True)
class PathfinderParams:
    """Everything that shapes one generated image; lengths are in output pixels (``pathfinder_params``).

    ``extra_clearance``, ``check_threshold`` (canvas intensity) and ``check_slack`` are ours (see
    ``data/pathfinder_generator.py``); the slack sits inside the window measured on the render: label-1
    markers join at ``2 * margin + 0.25`` or less, label-0 ones stay apart at ``2 * margin + 0.875`` or more.
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


def distance_sq(points: np.ndarray, origin: np.ndarray, unit: np.ndarray, a: float, b: float) -> np.ndarray:
    """Squared distances ``[C, P]`` from ``points`` ``[P]`` to the segments ``origin + [a, b] * unit``
    (``origin`` and ``unit`` broadcast to ``[C]``): rotate into each segment's frame, then clamp."""
    local = (points[None, :] - origin[:, None]) * np.conj(unit)[:, None]
    beyond = np.maximum(np.maximum(a - local.real, local.real - b), 0.0)
    return beyond * beyond + local.imag * local.imag


def random_unit(rng: np.random.Generator) -> complex:
    angle = rng.uniform(-math.pi, math.pi)
    return complex(math.cos(angle), math.sin(angle))


def pick(rng: np.random.Generator, values: Sequence[float]) -> float:
    """One of ``values``; a single value draws nothing, so the random stream stays as upstream's."""
    return float(values[int(rng.integers(len(values)))]) if len(values) > 1 else float(values[0])


@dataclass
class PaddlePath:
    owner: int
    tail: complex  # the free end of the first paddle (the "origin tip")
    head: complex  # the free end of the latest paddle (the "terminal tip")
    pivot: complex  # the joint the next paddle turns around
    unit: complex  # direction of the latest paddle
    contrast: float
    last: int  # scene index of the latest paddle


class Scene:
    """The paddles placed so far, the clearance rule for new ones, and the growth of paths.

    Any two paddles keep ``2 * margin`` edge to edge (centre lines ``thickness + 2 * margin`` apart), except
    consecutive paddles of one path. A target path also keeps ``extra_clearance`` more from the other target,
    from distractors and from the markers, so that no other path can join it in the pixel check. Placed
    paddles are kept as points every ``1 / 4`` pixel along their centre lines (the distances are then exact
    to a few thousandths of a pixel); a marker is one point with a radius.

    Paths grow paddle by paddle: a paddle of length L lies between ``margin`` and ``L + margin`` from its
    pivot and the next pivot is ``margin`` beyond it, so consecutive paddles are ``<= 2 * margin`` apart. The
    turn is drawn with weight ``cos(min(|turn| * continuity, pi/2)) ** 2`` among the turns that fit.
    """

    def __init__(self, params: PathfinderParams, margin: float, rng: np.random.Generator) -> None:
        self.params, self.margin, self.rng = params, margin, rng
        self.along = np.linspace(0.0, 1.0, math.ceil(params.paddle_length * 4) + 1)
        paddles = 2 * params.contour_length + params.num_distractor_snakes * params.distractor_length
        capacity = paddles * len(self.along) + 2
        self.points = np.zeros(capacity, dtype=np.complex128)
        self.point_owner = np.zeros(capacity, dtype=np.int64)
        self.point_paddle = np.zeros(capacity, dtype=np.int64)
        self.point_tight_sq = np.zeros(capacity)  # squared clearance from a point, rim included
        self.point_wide_sq = np.zeros(capacity)
        self.num_points = 0
        self.paddles: list[tuple[complex, complex, int, float]] = []  # start, end, owner, intensity
        self.discs: list[tuple[float, float, float]] = []  # x, y, radius
        self.tight = params.paddle_thickness + 2 * margin
        self.wide = self.tight + params.extra_clearance
        self.low = params.padding + params.paddle_thickness / 2
        self.high = params.resolution - self.low
        # Placed points farther than this from a turning pivot cannot touch any of its candidates.
        self.horizon_sq = (params.paddle_length + margin + self.wide + params.marker_radius) ** 2
        # Candidate turns: about one render pixel of arc between neighbouring candidate heads.
        count = max(16, math.ceil(2 * math.pi * (params.paddle_length + margin) * params.antialias_scale))
        turns = (np.arange(count) - count // 2) * (2 * math.pi / count)
        weights = np.cos(np.minimum(np.abs(turns) * params.continuity, math.pi / 2)) ** 2
        keep = weights > 1e-6
        self.turn_units, self.turn_weights = np.exp(1j * turns[keep]), weights[keep]

    def _append(self, points: np.ndarray, owner: int, paddle: int, radius: float) -> None:
        end = self.num_points + len(points)
        self.points[self.num_points : end] = points
        self.point_owner[self.num_points : end] = owner
        self.point_paddle[self.num_points : end] = paddle
        self.point_tight_sq[self.num_points : end] = (self.tight + radius) ** 2
        self.point_wide_sq[self.num_points : end] = (self.wide + radius) ** 2
        self.num_points = end

    def add(self, start: complex, end: complex, owner: int, intensity: float) -> int:
        self.paddles.append((start, end, owner, intensity))
        self._append(start + self.along * (end - start), owner, len(self.paddles) - 1, 0.0)
        return len(self.paddles) - 1

    def add_disc(self, centre: complex, radius: float) -> None:
        """A marker: later paddles keep the wide clearance from its rim."""
        self.discs.append((centre.real, centre.imag, radius))
        self._append(np.array([centre]), MARKER, -1, radius - self.params.paddle_thickness / 2)

    def paddles_of(self, owner: int) -> tuple[np.ndarray, np.ndarray]:
        mine = [(start, end) for start, end, paddle_owner, _ in self.paddles if paddle_owner == owner]
        return np.array([start for start, _ in mine]), np.array([end for _, end in mine])

    def snapshot(self) -> tuple[int, int]:
        return len(self.paddles), self.num_points

    def restore(self, state: tuple[int, int]) -> None:
        del self.paddles[state[0] :]
        self.num_points = state[1]

    def _need_sq(self, close: np.ndarray, owner: int) -> np.ndarray:
        """Squared clearances between path ``owner`` and the placed points ``close``: wide where a target
        meets another path or a marker, tight otherwise (the same path, or two distractors)."""
        other_owner = self.point_owner[close]
        if owner in TARGETS:
            return np.where(other_owner == owner, self.point_tight_sq[close], self.point_wide_sq[close])
        return np.where(other_owner < 2, self.point_wide_sq[close], self.point_tight_sq[close])

    def _inside(self, points: np.ndarray) -> np.ndarray:
        low, high = np.minimum(points.real, points.imag), np.maximum(points.real, points.imag)
        return (low >= self.low) & (high <= self.high)

    def fits(self, origins: np.ndarray, unit: complex, length: float, owner: int) -> np.ndarray:
        """Which first paddles ``origins[k] + [0, length] * unit`` of path ``owner`` fit: inside the
        window and clear of everything placed."""
        ok = self._inside(origins) & self._inside(origins + length * unit)
        if not self.num_points:
            return ok
        close = np.arange(self.num_points)
        units = np.full(origins.shape, unit)
        dist_sq = distance_sq(self.points[close], origins, units, 0.0, length)
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
        dist_sq = distance_sq(self.points[close], np.full(units.shape, pivot), units, a, b)
        return ok & (dist_sq >= need_sq).all(axis=1)

    def _paddle_intensity(self, contrast: float) -> float:
        return contrast * pick(self.rng, self.params.paddle_contrasts)

    def start(self, tail: complex, unit: complex, owner: int, contrast: float) -> PaddlePath:
        head = tail + self.params.paddle_length * unit
        index = self.add(tail, head, owner, self._paddle_intensity(contrast))
        return PaddlePath(owner, tail, head, head + self.margin * unit, unit, contrast, index)

    def extend(self, path: PaddlePath) -> bool:
        """Add one paddle to ``path``; False when no turn fits."""
        units = path.unit * self.turn_units
        a, b = self.margin, self.margin + self.params.paddle_length
        weights = self.turn_weights * self.turns_fit(path.pivot, units, a, b, path.owner, path.last)
        total = weights.sum()
        if total <= 0:
            return False
        choice = min(
            int(np.searchsorted(np.cumsum(weights), self.rng.random() * total, side="right")),
            len(weights) - 1,
        )
        unit = complex(units[choice])
        start, end = path.pivot + a * unit, path.pivot + b * unit
        path.last = self.add(start, end, path.owner, self._paddle_intensity(path.contrast))
        path.unit, path.head, path.pivot = unit, end, end + self.margin * unit
        return True


def paint(scene: Scene) -> np.ndarray:
    """The antialiasing canvas ``[res * scale] ** 2``: the scene's paddles and marker discs as box-filtered
    coverage at ``antialias_scale``x; overlapping strokes take the maximum."""
    params = scene.params
    scale = params.antialias_scale
    size = params.resolution * scale
    canvas = np.zeros((size, size))
    half = params.paddle_thickness * scale / 2
    for start, end, _, intensity in scene.paddles:
        p0, p1 = np.array([start.real, start.imag]) * scale, np.array([end.real, end.imag]) * scale
        x0, y0 = np.floor(np.minimum(p0, p1) - half - 1).astype(int).clip(0, size)
        x1, y1 = np.ceil(np.maximum(p0, p1) + half + 1).astype(int).clip(0, size)
        ys, xs = np.mgrid[y0:y1, x0:x1] + 0.5
        length = float(np.hypot(*(p1 - p0)))
        ux, uy = (p1 - p0) / length
        along = (xs - p0[0]) * ux + (ys - p0[1]) * uy
        across = np.abs((xs - p0[0]) * uy - (ys - p0[1]) * ux)
        cover = np.clip(half + 0.5 - across, 0, 1) * np.clip(np.minimum(along, length - along) + 0.5, 0, 1)
        np.maximum(canvas[y0:y1, x0:x1], intensity * cover, out=canvas[y0:y1, x0:x1])
    for x, y, radius in scene.discs:
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


def markers_connected(
    params: PathfinderParams, canvas: np.ndarray, markers: Sequence[tuple[float, float]], margin: float
) -> bool:
    """Whether the two markers (``(x, y)`` centres in output pixels) are joined in the canvas, counting gaps
    up to ``2 * margin + check_slack`` as joined: the pixels ``>= check_threshold`` are grown by half that
    and labelled with 8-connectivity, and the markers are joined when their centres fall in one component."""
    scale = params.antialias_scale
    radius = (2 * margin + params.check_slack) * scale / 2
    reach = math.floor(radius)
    ys, xs = np.mgrid[-reach : reach + 1, -reach : reach + 1]
    grown = ndimage.binary_dilation(
        canvas >= params.check_threshold, structure=xs * xs + ys * ys <= radius * radius
    )
    labels, _ = ndimage.label(grown, structure=np.ones((3, 3)))
    (ax, ay), (bx, by) = markers
    first, second = labels[int(ay * scale), int(ax * scale)], labels[int(by * scale), int(bx * scale)]
    return bool(first) and first == second
