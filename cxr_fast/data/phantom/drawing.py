"""Drawing one radiograph: chest geometry, anatomy and one painter per finding (`draw_radiograph`).

The package docstring ("Drawing") says what is drawn and how findings and hardness show.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from cxr_fast.data.phantom.exposure import FINDING_NOISE_SD_WHEN_HARD, expose, finding_noise
from cxr_fast.errors import CxrError
from cxr_fast.tasks import CHEXPERT_LABELS, TASK_COLUMNS, TASKS

__all__ = ["FINDING_CONTRAST_WHEN_HARD", "FINDING_NOISE_SD_WHEN_HARD", "PAINTERS", "draw_radiograph",
           "draw_radiograph_with_regions", "painter_for"]

MIN_IMAGE_SIZE = 16  # smaller images cannot hold the drawn anatomy

# How the planted disparity looks: in a harder image every finding keeps this fraction of its
# contrast and gets blotchy noise of this sd inside it.
FINDING_CONTRAST_WHEN_HARD = 0.2


# ------------------------------------------------------------------------------ geometry
#
# Everything is drawn in chest coordinates: the unit square, x to the image's right (the
# patient's left on a frontal), y down. `_Frame` maps them to pixels with this image's zoom,
# rotation and shift. Intensities are "density" in [0, 1]: air dark, bone bright.

BACKGROUND_LEVEL = 0.04
BODY_LEVEL = 0.50
MEDIASTINUM_LEVEL = 0.64
HEART_LEVEL = 0.62
BONE_GAIN = 0.16  # a bone line at level 1.0 adds this much density


@dataclass(frozen=True)
class _Frame:
    size: int
    zoom: float
    angle: float  # radians
    shift: tuple[float, float]  # fraction of the image

    def to_pixels(self, xy: Iterable) -> list[tuple[float, float]]:
        points = np.asarray(xy, dtype=np.float64).reshape(-1, 2) - 0.5
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        x = (points[:, 0] * cos - points[:, 1] * sin) * self.zoom + 0.5 + self.shift[0]
        y = (points[:, 0] * sin + points[:, 1] * cos) * self.zoom + 0.5 + self.shift[1]
        return list(zip((x * self.size).tolist(), (y * self.size).tolist()))

    def pixels(self, length: float) -> float:
        return length * self.zoom * self.size

    def reduced(self, factor: int) -> "_Frame":
        return replace(self, size=max(8, self.size // factor))


@dataclass(frozen=True)
class _Ellipse:
    cx: float
    cy: float
    rx: float
    ry: float
    tilt: float = 0.0

    def outline(self, n: int = 40) -> np.ndarray:
        t = np.linspace(0.0, 2 * np.pi, n, endpoint=False)
        x, y = self.rx * np.cos(t), self.ry * np.sin(t)
        cos, sin = math.cos(self.tilt), math.sin(self.tilt)
        return np.stack([self.cx + x * cos - y * sin, self.cy + x * sin + y * cos], axis=1)


@dataclass(frozen=True)
class _Lung:
    outline: np.ndarray  # closed polygon
    wall: np.ndarray  # chest-wall edge, from the apex down to the costophrenic angle
    far_base: np.ndarray  # the other end of the diaphragm (medial, or anterior on a lateral)
    hilum: np.ndarray

    def wall_point(self, t: float) -> np.ndarray:
        return _along(self.wall, t)[0]

    def inner_point(self, rng: np.random.Generator, depth: tuple[float, float] = (0.3, 0.8)) -> np.ndarray:
        """A random point between the hilum and the chest wall (inside the lung)."""
        wall = self.wall_point(rng.uniform(0.15, 0.9))
        return self.hilum + rng.uniform(*depth) * (wall - self.hilum)


@dataclass(frozen=True)
class _Chest:
    frame: _Frame
    body: np.ndarray
    lungs: tuple[_Lung, ...]
    lung_level: float
    solids: tuple[tuple[np.ndarray, float], ...]  # (polygon, level) painted over the lungs in order
    heart: _Ellipse
    heart_growth: tuple[float, float]  # where an enlarged heart extends to
    mediastinum: np.ndarray
    bone_lines: tuple[tuple[np.ndarray, float, float], ...]  # (points, width, level)
    ribs: tuple[np.ndarray, ...]  # rib centre lines a fracture may break
    rib_width: float
    rib_break: tuple[float, float]  # where along a rib a break shows over lung
    tube: np.ndarray  # endotracheal tube path
    central_line: np.ndarray
    pacer: np.ndarray


def _along(points: np.ndarray, t: float) -> tuple[np.ndarray, np.ndarray]:
    """Point at fraction t of a polyline's length, and the unit direction there."""
    steps = np.diff(points, axis=0)
    lengths = np.hypot(steps[:, 0], steps[:, 1])
    target = t * lengths.sum()
    index = min(int(np.searchsorted(np.cumsum(lengths), target)), len(steps) - 1)
    before = lengths[:index].sum()
    fraction = (target - before) / max(lengths[index], 1e-9)
    return points[index] + fraction * steps[index], steps[index] / max(lengths[index], 1e-9)


def _random_frame(rng: np.random.Generator, size: int) -> _Frame:
    return _Frame(size=size, zoom=rng.uniform(0.88, 1.04), angle=rng.uniform(-0.05, 0.05),
                  shift=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)))


def _frontal_chest(rng: np.random.Generator, frame: _Frame) -> _Chest:
    half_width = rng.uniform(0.33, 0.39)
    top = rng.uniform(0.10, 0.15)
    base = rng.uniform(0.70, 0.78)
    dome = rng.uniform(0.06, 0.10)
    # Image left is the patient's right, whose hemidiaphragm sits a little higher.
    lungs = (_frontal_lung(-1, half_width, top, base - 0.02, dome), _frontal_lung(1, half_width, top, base, dome))
    # A normal heart: cardiothoracic ratio ~0.4, resting on the left hemidiaphragm.
    heart = _Ellipse(0.5 + rng.uniform(0.035, 0.06), base - dome - rng.uniform(0.02, 0.05),
                     rng.uniform(0.13, 0.155), rng.uniform(0.09, 0.11), tilt=rng.uniform(0.25, 0.5))
    heart_top = heart.cy - heart.ry
    mediastinum = np.array([[0.44, 0.0], [0.56, 0.0], [0.565, top], [0.57, heart_top + 0.02],
                            [0.43, heart_top + 0.02], [0.435, top]])
    body = np.array([[0.41, -0.05], [0.59, -0.05], [0.62, 0.03], [0.5 + half_width + 0.12, 0.08],
                     [0.5 + half_width + 0.10, 0.35], [0.5 + half_width + 0.09, 0.7], [0.5 + half_width + 0.1, 1.05],
                     [0.5 - half_width - 0.1, 1.05], [0.5 - half_width - 0.09, 0.7], [0.5 - half_width - 0.10, 0.35],
                     [0.5 - half_width - 0.12, 0.08], [0.38, 0.03]])
    solids = (
        (mediastinum, MEDIASTINUM_LEVEL),
        (_Ellipse(0.565, top + 0.12, 0.035, 0.03).outline(), MEDIASTINUM_LEVEL),  # aortic knob
        (heart.outline(), HEART_LEVEL),
        (_Ellipse(0.5 + 0.2, base + 0.05, rng.uniform(0.03, 0.06), 0.03).outline(), 0.28),  # gastric bubble
        (np.array([[0.49, 0.0], [0.51, 0.0], [0.515, top + 0.1], [0.485, top + 0.1]]), 0.30),  # trachea
    )
    ribs, bones = [], [(np.array([[0.5, -0.05], [0.5, 1.05]]), 0.05, 0.5)]  # spine
    spacing = (base - top) / 8.5
    for side in (-1, 1):
        for i in range(9):
            rib = _frontal_rib(side, top - 0.02 + i * spacing, half_width)
            ribs.append(rib)
            bones.append((rib, 0.016, 1.0))
            anterior = np.array([[0.5 + side * half_width, top + 0.05 + i * spacing],
                                 [0.5 + side * (half_width * 0.6), top + 0.09 + i * spacing],
                                 [0.5 + side * 0.13, top + 0.15 + i * spacing]])
            bones.append((anterior, 0.012, 0.45))
        bones.append((np.array([[0.5 + side * 0.04, top + 0.03], [0.5 + side * 0.17, top - 0.005],
                                [0.5 + side * 0.31, top - 0.03]]), 0.025, 1.0))  # clavicle
    bones.extend(_vessels(rng, lungs))
    return _Chest(
        frame=frame, body=body, lungs=lungs, lung_level=0.14, solids=solids, heart=heart,
        heart_growth=(0.035, 0.012), mediastinum=mediastinum, bone_lines=tuple(bones),
        ribs=tuple(ribs[1:8] + ribs[10:17]), rib_width=0.016, rib_break=(0.55, 0.85),
        tube=np.array([[0.5, -0.05], [0.502, top + 0.05], [0.505, top + 0.13]]),
        central_line=np.array([[0.5 + 0.3, top - 0.04], [0.5 + 0.16, top + 0.0], [0.5 + 0.04, top + 0.1],
                               [0.5 + 0.02, heart_top]]),
        pacer=np.array([0.5 + 0.27, top + 0.04]),
    )


def _frontal_lung(side: int, half_width: float, top: float, base: float, dome: float) -> _Lung:
    t = np.linspace(0.04, 1.0, 14)
    wall = np.stack([0.5 + side * (0.16 + (half_width - 0.16) * np.sin(t * np.pi / 2) ** 0.55),
                     top + (base - top) * t], axis=1)
    wall = np.vstack([[0.5 + side * 0.14, top], wall])
    u = np.linspace(0.0, 1.0, 12)[1:]
    diaphragm = np.stack([0.5 + side * (half_width - (half_width - 0.06) * u),
                          base - dome * np.sin(np.pi * 0.9 * u) ** 0.8], axis=1)
    medial = np.array([[0.5 + side * 0.07, top + 0.2], [0.5 + side * 0.08, top + 0.05]])
    outline = np.vstack([wall, diaphragm, medial])
    hilum = np.array([0.5 + side * 0.13, top + 0.42 * (base - top)])
    return _Lung(outline=outline, wall=wall, far_base=diaphragm[-1], hilum=hilum)


def _frontal_rib(side: int, y: float, half_width: float) -> np.ndarray:
    """A posterior rib: from the spine out and up, then down along the chest wall."""
    t = np.linspace(0.0, 1.0, 9)
    return np.stack([0.5 + side * (0.06 + t * (half_width - 0.045)),
                     y - 0.03 * np.sin(np.pi * t * 0.9) + 0.09 * t ** 3], axis=1)


def _lateral_chest(rng: np.random.Generator, frame: _Frame) -> _Chest:
    """Patient facing image left: sternum left, spine right, one superimposed lung field."""
    top = rng.uniform(0.08, 0.13)
    base = rng.uniform(0.74, 0.82)
    back = rng.uniform(0.76, 0.82)
    front = rng.uniform(0.22, 0.27)
    wall = np.array([[0.52, top], [0.62, top + 0.04], [0.70, top + 0.15], [back - 0.02, 0.4],
                     [back, base - 0.1], [back + 0.01, base]])
    diaphragm = np.array([[back - 0.05, base - 0.04], [0.6, base - 0.1], [0.45, base - 0.11],
                          [front + 0.04, base - 0.08], [front + 0.02, base - 0.06]])
    anterior = np.array([[front, 0.55], [front + 0.03, 0.3], [0.4, top + 0.04]])
    lung = _Lung(outline=np.vstack([wall, diaphragm, anterior]), wall=wall,
                 far_base=diaphragm[-1], hilum=np.array([0.52, 0.45]))
    heart = _Ellipse(front + rng.uniform(0.13, 0.16), base - rng.uniform(0.16, 0.19),
                     rng.uniform(0.13, 0.15), rng.uniform(0.11, 0.13), tilt=rng.uniform(-0.5, -0.3))
    mediastinum = np.array([[front + 0.1, top + 0.02], [0.47, top + 0.02], [0.48, 0.42], [front + 0.08, 0.45],
                            [front + 0.05, 0.3]])
    body = _Ellipse(0.52, 0.58, 0.44, 0.62).outline(48)
    vertebrae = tuple((_Ellipse(back + 0.07, y, 0.045, 0.028).outline(16), 0.72)
                      for y in np.arange(0.05, 1.0, 0.075))
    solids = (
        (np.array([[0.5, -0.05], [0.55, -0.05], [0.56, 0.35], [0.52, 0.35]]), 0.3),  # trachea
        (mediastinum, 0.38),
        (heart.outline(), 0.55),
        *vertebrae,
    )
    ribs, bones = [], [(np.array([[front - 0.04, 0.18], [front - 0.02, 0.55]]), 0.022, 0.8)]  # sternum
    for i in range(8):
        y = top + 0.04 + i * (base - top) / 8.5
        rib = np.array([[back + 0.04, y], [back - 0.1, y + 0.05], [0.45, y + 0.12], [front + 0.05, y + 0.2]])
        ribs.append(rib)
        bones.append((rib, 0.014, 0.6))
    bones.extend(_vessels(rng, (lung,)))
    return _Chest(
        frame=frame, body=body, lungs=(lung,), lung_level=0.26, solids=solids, heart=heart,
        heart_growth=(0.05, 0.0), mediastinum=mediastinum, bone_lines=tuple(bones),
        ribs=tuple(ribs[1:7]), rib_width=0.014, rib_break=(0.12, 0.45),
        tube=np.array([[0.5, -0.05], [0.53, top + 0.1], [0.54, top + 0.18]]),
        central_line=np.array([[0.45, -0.02], [0.48, top + 0.12], [0.46, 0.42]]),
        pacer=np.array([front + 0.02, top + 0.06]),
    )


def _vessels(rng: np.random.Generator, lungs: Iterable[_Lung]) -> list[tuple[np.ndarray, float, float]]:
    """Faint branching lung markings fanning out from each hilum."""
    lines = []
    for lung in lungs:
        for _ in range(7):
            wall = lung.wall_point(rng.uniform(0.1, 0.95))
            end = lung.hilum + rng.uniform(0.35, 0.7) * (wall - lung.hilum)
            middle = (lung.hilum + end) / 2 + rng.normal(0.0, 0.015, 2)
            lines.append((np.stack([lung.hilum, middle, end]), 0.006, 0.4))
    return lines


# ------------------------------------------------------------------------------ painting


class _Canvas:
    """One 8-bit drawing surface in chest coordinates, read back blurred as float32 in [0, 1].

    `reduce` draws at 1/reduce resolution and scales up: for very blurred layers that is
    indistinguishable and several times cheaper.
    """

    def __init__(self, frame: _Frame, *, reduce: int = 1) -> None:
        self.full_size = frame.size
        reduce = min(reduce, max(1, frame.size // 128))  # never below 128 px: small images stay sharp
        self.frame = frame.reduced(reduce) if reduce > 1 else frame
        self.image = Image.new("L", (self.frame.size, self.frame.size), 0)
        self.draw = ImageDraw.Draw(self.image)

    def fill(self, level: float) -> None:
        self.draw.rectangle((0, 0, self.frame.size, self.frame.size), fill=_byte(level))

    def polygon(self, points: np.ndarray, level: float = 1.0) -> None:
        self.draw.polygon(self.frame.to_pixels(points), fill=_byte(level))

    def line(self, points: np.ndarray, width: float, level: float = 1.0) -> None:
        self.draw.line(self.frame.to_pixels(points), fill=_byte(level),
                       width=max(1, round(self.frame.pixels(width))), joint="curve")

    def lines(self, lines: Iterable[tuple[np.ndarray, float, float]]) -> None:
        """Many (points, width, level) lines with one coordinate transform (ribs, vessels)."""
        lines = list(lines)
        pixels = self.frame.to_pixels(np.concatenate([points for points, _, _ in lines]))
        start = 0
        for points, width, level in lines:
            self.draw.line(pixels[start:start + len(points)], fill=_byte(level),
                           width=max(1, round(self.frame.pixels(width))), joint="curve")
            start += len(points)

    def array(self, blur: float) -> np.ndarray:
        image = self.image
        radius = self.frame.pixels(blur)
        if radius >= 0.3:
            image = image.filter(ImageFilter.GaussianBlur(radius))
        if image.size[0] != self.full_size:
            image = image.resize((self.full_size, self.full_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.float32) * np.float32(1 / 255)


def _byte(level: float) -> int:
    return int(round(min(max(level, 0.0), 1.0) * 255))


class _Anatomy:
    """The painted normal chest: `base` (soft tissue, air, heart) and `bones` (density added)."""

    def __init__(self, chest: _Chest) -> None:
        self.chest = chest
        base = _Canvas(chest.frame, reduce=2)
        base.fill(BACKGROUND_LEVEL)
        base.polygon(chest.body, BODY_LEVEL)
        for lung in chest.lungs:
            base.polygon(lung.outline, chest.lung_level)
        for polygon, level in chest.solids:
            base.polygon(polygon, level)
        self.base = base.array(blur=0.006)
        bones = _Canvas(chest.frame)
        bones.lines(chest.bone_lines)
        self.bones = bones.array(blur=0.0025) * np.float32(BONE_GAIN)

    @functools.cached_property
    def lung_mask(self) -> np.ndarray:
        """Where lung findings may show: the lungs minus heart, mediastinum and the like."""
        canvas = _Canvas(self.chest.frame, reduce=4)
        for lung in self.chest.lungs:
            canvas.polygon(lung.outline)
        for polygon, _ in self.chest.solids:
            canvas.polygon(polygon, 0.0)
        return canvas.array(blur=0.008)

    def image(self) -> np.ndarray:
        return self.base + self.bones


Painter = Callable[[_Chest, _Anatomy, np.random.Generator], np.ndarray]


def _paint_cardiomegaly(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    heart = chest.heart
    grow = rng.uniform(1.35, 1.6)
    big = replace(heart, rx=heart.rx * grow, ry=heart.ry * rng.uniform(1.12, 1.3),
                  cx=heart.cx + chest.heart_growth[0] * grow, cy=heart.cy + chest.heart_growth[1] * grow)
    canvas = _Canvas(chest.frame, reduce=2)
    canvas.polygon(big.outline())
    return canvas.array(blur=0.006) * np.maximum(HEART_LEVEL - anatomy.base, 0.0)


def _paint_enlarged_mediastinum(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    centre = chest.mediastinum[:, 0].mean()
    wide = chest.mediastinum.copy()
    wide[:, 0] = centre + (wide[:, 0] - centre) * rng.uniform(1.6, 2.0)
    canvas = _Canvas(chest.frame, reduce=2)
    canvas.polygon(wide)
    return canvas.array(blur=0.006) * np.maximum(MEDIASTINUM_LEVEL - anatomy.base, 0.0)


def _paint_effusion(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Fluid filling a lung base, its upper edge a meniscus climbing the chest wall."""
    sides = chest.lungs
    if len(chest.lungs) == 2:  # frontal: right only, left only or both
        sides = ((chest.lungs[0],), (chest.lungs[1],), chest.lungs)[rng.choice(3, p=(0.3, 0.25, 0.45))]
    canvas = _Canvas(chest.frame, reduce=2)
    for lung in sides:
        angle, far = lung.wall[-1], lung.far_base
        wall_y = angle[1] - rng.uniform(0.18, 0.35)  # the meniscus climbs the chest wall
        far_y = far[1] - rng.uniform(0.03, 0.1)
        wall_x = np.interp(wall_y, lung.wall[:, 1], lung.wall[:, 0])
        u = np.linspace(0.0, 1.0, 12)
        meniscus = np.stack([wall_x + (far[0] - wall_x) * u, wall_y + (far_y - wall_y) * np.sqrt(u)], axis=1)
        below = np.array([[far[0], angle[1] + 0.15], [wall_x, angle[1] + 0.15]])
        canvas.polygon(np.vstack([meniscus, below]))
    return canvas.array(blur=0.005) * anatomy.lung_mask * np.float32(0.95 * (BODY_LEVEL - chest.lung_level))


def _paint_edema(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Bat-wing haze around both hila, fading towards the periphery."""
    canvas = _Canvas(chest.frame, reduce=4)
    for lung in chest.lungs:
        centre = lung.hilum + 0.2 * (lung.wall_point(0.5) - lung.hilum)
        canvas.polygon(_Ellipse(*centre, 0.11 * rng.uniform(0.9, 1.2), 0.15 * rng.uniform(0.9, 1.2)).outline())
        for _ in range(4):
            canvas.polygon(_Ellipse(*lung.inner_point(rng, (0.1, 0.6)), 0.05, 0.04).outline(16), level=0.8)
    return canvas.array(blur=0.03) * anatomy.lung_mask * np.float32(0.34)


def _paint_airspace(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Consolidation / pneumonia: a cluster of merging opacities in one lung zone."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    centre = lung.inner_point(rng, (0.35, 0.8))
    canvas = _Canvas(chest.frame, reduce=2)
    for _ in range(rng.integers(6, 11)):
        spot = centre + rng.normal(0.0, 0.035, 2)
        canvas.polygon(_Ellipse(*spot, rng.uniform(0.02, 0.045), rng.uniform(0.02, 0.04)).outline(20))
    return canvas.array(blur=0.01) * anatomy.lung_mask * np.float32(0.42)


def _paint_atelectasis(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A plate-like band in a lower zone."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    centre = lung.hilum + rng.uniform(0.5, 0.7) * (lung.wall[-1] - lung.hilum)
    half = rng.uniform(0.05, 0.075) * np.array([math.cos(a := rng.uniform(-0.3, 0.3)), math.sin(a)])
    canvas = _Canvas(chest.frame)
    canvas.line(np.stack([centre - half, centre + half]), width=0.016)
    return canvas.array(blur=0.005) * anatomy.lung_mask * np.float32(0.32)


def _paint_lung_opacity(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    canvas = _Canvas(chest.frame, reduce=2)
    for _ in range(rng.integers(1, 4)):
        lung = chest.lungs[rng.integers(len(chest.lungs))]
        radius = rng.uniform(0.03, 0.05)
        canvas.polygon(_Ellipse(*lung.inner_point(rng), radius, radius * rng.uniform(0.7, 1.0)).outline(24))
    return canvas.array(blur=0.018) * anatomy.lung_mask * np.float32(0.26)


def _paint_lung_lesion(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A well-defined round nodule."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    radius = rng.uniform(0.018, 0.03)
    canvas = _Canvas(chest.frame)
    canvas.polygon(_Ellipse(*lung.inner_point(rng, (0.3, 0.75)), radius, radius).outline(24))
    return canvas.array(blur=0.002) * anatomy.lung_mask * np.float32(0.38)


def _paint_pneumothorax(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Air between the upper chest wall and a visible pleural line: darker, with a thin edge."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    upper = lung.wall[: max(3, int(len(lung.wall) * rng.uniform(0.45, 0.7)))]
    pleura = upper + rng.uniform(0.15, 0.3) * (lung.hilum - upper)
    band, edge = _Canvas(chest.frame, reduce=2), _Canvas(chest.frame)
    band.polygon(np.vstack([upper, pleura[::-1]]))
    edge.line(pleura, width=0.005)
    return (edge.array(blur=0.0015) * np.float32(0.14)
            - band.array(blur=0.004) * anatomy.lung_mask * np.float32(0.11))


def _paint_pleural_other(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Pleural thickening: a band along part of the chest wall."""
    lung = chest.lungs[rng.integers(len(chest.lungs))]
    start = rng.uniform(0.2, 0.5)
    segment = np.stack([lung.wall_point(t) for t in np.linspace(start, start + 0.35, 6)])
    segment = segment + 0.012 * (lung.hilum - segment) / np.linalg.norm(lung.hilum - segment, axis=1, keepdims=True)
    canvas = _Canvas(chest.frame)
    canvas.line(segment, width=0.014)
    return canvas.array(blur=0.004) * np.float32(0.28)


def _paint_fracture(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A clear gap through a rib with a bright callus around it (visible even at 32 px)."""
    rib = chest.ribs[rng.integers(len(chest.ribs))]
    point, direction = _along(rib, rng.uniform(*chest.rib_break))
    callus, gap = _Canvas(chest.frame), _Canvas(chest.frame)
    callus.polygon(_Ellipse(*point, 0.032, 0.022, tilt=math.atan2(direction[1], direction[0])).outline(24))
    gap.line(np.stack([point - 0.012 * direction, point + 0.012 * direction]), width=chest.rib_width * 2.0)
    gap_mask = gap.array(blur=0.0015)
    bright = callus.array(blur=0.006) * np.float32(0.42)
    return bright * (1 - gap_mask) - anatomy.bones * gap_mask


def _paint_support_devices(chest: _Chest, anatomy: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Some of: endotracheal tube, central venous line, pacemaker with its lead."""
    tube, line, pacer = rng.random(3) < (0.6, 0.4, 0.3)
    canvas = _Canvas(chest.frame)
    if tube or not (line or pacer):
        canvas.line(chest.tube, width=0.012, level=0.8)
    if line:
        canvas.line(chest.central_line, width=0.006, level=0.7)
    if pacer:
        box = np.array([[-0.035, -0.022], [0.035, -0.022], [0.035, 0.022], [-0.035, 0.022]]) + chest.pacer
        canvas.polygon(box, level=1.0)
        heart = np.array([chest.heart.cx, chest.heart.cy])
        lead = np.stack([chest.pacer, (chest.pacer + heart) / 2 + [0.0, 0.05], heart])
        canvas.line(lead, width=0.006, level=0.7)
    return canvas.array(blur=0.002) * np.float32(0.6)


# One painter per finding; Consolidation also stands for Pneumonia (both are airspace opacity).
PAINTERS: dict[str, Painter] = {
    "Atelectasis": _paint_atelectasis,
    "Cardiomegaly": _paint_cardiomegaly,
    "Consolidation": _paint_airspace,
    "Edema": _paint_edema,
    "Enlarged Cardiomediastinum": _paint_enlarged_mediastinum,
    "Fracture": _paint_fracture,
    "Lung Lesion": _paint_lung_lesion,
    "Lung Opacity": _paint_lung_opacity,
    "Pleural Effusion": _paint_effusion,
    "Pleural Other": _paint_pleural_other,
    "Pneumothorax": _paint_pneumothorax,
    "Support Devices": _paint_support_devices,
}

# Names draw_radiograph accepts: CheXpert labels and task slugs -> painter (None: draws nothing).
_FINDING_NAMES: dict[str, str | None] = {
    **{finding: finding for finding in PAINTERS},
    "Pneumonia": "Consolidation",
    "No Finding": None,
    **{task: ("Consolidation" if task == "pneumonia" else TASK_COLUMNS[task][0])
       for task in TASKS if task != "no_finding"},
    "no_finding": None,
}


def painter_for(finding: str) -> str | None:
    """The PAINTERS name that draws a CheXpert label or task slug (None: draws nothing)."""
    if finding not in _FINDING_NAMES:
        raise CxrError(f"unknown finding {finding!r}; use CheXpert labels ({', '.join(CHEXPERT_LABELS)}) or task names")
    return _FINDING_NAMES[finding]


def _finding_strengths(findings: Mapping[str, float | bool]) -> dict[str, float]:
    strengths: dict[str, float] = {}
    for name, value in findings.items():
        if name not in _FINDING_NAMES:
            raise CxrError(f"unknown finding {name!r}; use CheXpert labels ({', '.join(CHEXPERT_LABELS)}) "
                           "or task names")
        strength = float(value)
        if not 0.0 <= strength <= 1.0:
            raise CxrError(f"finding {name!r}: strength must be in [0, 1] (True = 1, uncertain = 0.5), got {value!r}")
        painter = _FINDING_NAMES[name]
        if painter is not None and strength > 0:
            strengths[painter] = max(strengths.get(painter, 0.0), strength)
    return strengths


def draw_radiograph(findings: Mapping[str, float | bool], *, rng: np.random.Generator, size: int,
                    hardness: float = 0.0, lateral: bool = False) -> np.ndarray:
    """Draw one chest radiograph as a `uint8` (size, size) array.

    `findings` maps CheXpert labels (or task slugs) to True/False or a strength in [0, 1]
    (the phantom draws uncertain labels at 0.5). `hardness` in [0, 1] lowers the findings'
    contrast towards FINDING_CONTRAST_WHEN_HARD and overlays blotchy noise on them; it
    changes nothing in an image without findings. Anatomy, each finding, exposure and the
    hardness noise use separate streams spawned from `rng`, so the same `rng` state gives
    the same patient whichever findings are drawn.
    """
    return draw_radiograph_with_regions(findings, rng=rng, size=size, hardness=hardness, lateral=lateral)[0]


def draw_radiograph_with_regions(findings: Mapping[str, float | bool], *, rng: np.random.Generator, size: int,
                                 hardness: float = 0.0, lateral: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """`draw_radiograph`'s image (the same pixels for the same arguments) and, for each drawn
    finding (a PAINTERS name), where it shows: a bool (size, size) mask of the pixels whose
    density the finding changed by at least REGION_MIN_DENSITY (before hardness lowers its
    contrast: the region is where the finding is, however faintly a hard image shows it)."""
    if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
        raise CxrError(f"image size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}")
    if not 0.0 <= hardness <= 1.0:
        raise CxrError(f"hardness must be in [0, 1], got {hardness!r}")
    strengths = _finding_strengths(findings)
    anatomy_rng, exposure_rng, hardness_rng, *finding_rngs = rng.spawn(3 + len(PAINTERS))
    work = _working_size(int(size))
    frame = _random_frame(anatomy_rng, work)
    chest = (_lateral_chest if lateral else _frontal_chest)(anatomy_rng, frame)
    anatomy = _Anatomy(chest)
    drawn = np.zeros((work, work), dtype=np.float32)
    regions: dict[str, np.ndarray] = {}
    for (name, painter), finding_rng in zip(PAINTERS.items(), finding_rngs):
        if name in strengths:
            layer = np.float32(strengths[name]) * painter(chest, anatomy, finding_rng)
            drawn += layer
            regions[name] = _region_mask(layer, size)
    density = anatomy.image()
    if strengths:
        contrast = 1.0 - hardness * (1.0 - FINDING_CONTRAST_WHEN_HARD)
        density += np.float32(contrast) * drawn
        if hardness > 0:
            density += np.float32(hardness) * finding_noise(hardness_rng, drawn)
    pixels = expose(exposure_rng, density)
    if work != size:
        pixels = np.asarray(Image.fromarray(pixels).resize((size, size), Image.Resampling.BILINEAR))
    return pixels, regions


# A finding's region: where it changes the density by at least this much (about 5 grey levels
# after exposure); the blurred fringe below it is invisible.
REGION_MIN_DENSITY = 0.02


def _region_mask(layer: np.ndarray, size: int) -> np.ndarray:
    mask = np.abs(layer) >= REGION_MIN_DENSITY
    if mask.shape[0] != size:
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
    return mask


def _working_size(size: int) -> int:
    """Resolution the chest is drawn at: above 256 px, half the output, then scaled up.

    Radiographs are smooth at this scale (the finest drawn structure, a rib edge, is still
    several pixels), and drawing a quarter of the pixels halves the generation time.
    """
    return size if size <= 256 else (size + 1) // 2
