"""Synthetic crowds: the embedded default data set of SKT (no download, exact head points).

Each image is a random scene (sky/buildings/ground, tiled plaza, grass or noise texture, gradients,
distractor objects including round non-head blobs) with person-like figures (legs, torso, arms, head
with hair or hat) placed on a ground plane seen in perspective: a figure's height grows linearly with
the distance of its feet below the horizon, figures are drawn far-to-near so nearer people occlude
farther ones, and crowds mix a uniform spread with clusters. A head is annotated at its centre when it
is inside the image and at least ``min_visible`` of it is unoccluded (as a human annotator would).

The images are written to disk in vkd's generic format (``NAME.png`` + ``NAME.json`` holding
``{"points": [[x, y], ...]}``) so the embedded default goes through the same loader as real data.
"""

from __future__ import annotations

import colorsys
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vkd.cache import atomic_write_text, build_once

__all__ = ["CrowdSpec", "generate_crowd", "write_crowd_dataset"]

_FORMAT_VERSION = 2


@dataclass(frozen=True)
class CrowdSpec:
    """Generator parameters (all sizes in output pixels).

    Attributes:
        height: image height.
        width: image width.
        count_min: fewest people placed in an image.
        count_max: most people placed (counts are log-uniform in between).
        min_visible: fraction of a head that must be unoccluded for it to be annotated.
        min_person: height in pixels of the farthest (smallest) figures; heads are about 1/6 of it. Keeps
            far heads countable at small image sizes.
        max_person: tallest figure height as a fraction of the image height (sparse scenes).
        supersample: drawing resolution factor (anti-aliasing; the ID map for occlusion uses it too).
    """

    height: int = 128
    width: int = 128
    count_min: int = 3
    count_max: int = 400
    min_visible: float = 0.3
    min_person: float = 14.0
    max_person: float = 0.45
    supersample: int = 2

    def __post_init__(self) -> None:
        if self.height < 16 or self.width < 16:
            raise ValueError(f"crowd images must be at least 16x16, got {self.height}x{self.width}")
        if not 1 <= self.count_min <= self.count_max:
            raise ValueError(f"need 1 <= count_min <= count_max, got {self.count_min}, {self.count_max}")


def _rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, amp: float) -> np.ndarray:
    """Low-frequency RGB noise ``[h, w, 3]`` (bicubic upsampling of a coarse random grid)."""
    coarse = rng.normal(0.0, amp, size=(cells, cells, 3)).astype(np.float32)
    channels = [np.asarray(Image.fromarray(coarse[..., c], mode="F").resize((w, h), Image.BICUBIC)) for c in range(3)]
    return np.stack(channels, -1)


def _background(rng: np.random.Generator, h: int, w: int, horizon: float) -> Image.Image:
    """A random scene ``[h, w]`` RGB: ground below ``horizon`` (pixel row, may be < 0), something above."""
    kind = rng.choice(["street", "plaza", "grass", "noise", "gradient"])
    ground = np.array(_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.5), rng.uniform(0.25, 0.8)), np.float32)
    upper = np.array(_rgb(rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.6), rng.uniform(0.5, 1.0)), np.float32)
    rows = np.arange(h, dtype=np.float32)[:, None, None]
    img = np.where(rows >= horizon, ground, upper) * np.ones((1, w, 1), np.float32)
    # Vertical shading so the ground darkens/brightens with distance.
    img *= (1.0 + rng.uniform(-0.3, 0.3) * (rows / h - 0.5))
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    if kind == "street" and horizon > 0:
        x = -rng.uniform(0, 0.1) * w
        while x < w:  # building facades above the horizon, with windows
            bw = rng.uniform(0.1, 0.35) * w
            top = rng.uniform(-0.2, 0.8) * horizon
            col = _rgb(rng.uniform(0, 1), rng.uniform(0, 0.4), rng.uniform(0.3, 0.9))
            draw.rectangle([x, top, x + bw, horizon], fill=col)
            win = _rgb(rng.uniform(0.5, 0.7), 0.3, rng.uniform(0.2, 0.9))
            step = max(3.0, bw / rng.uniform(3, 6))
            for wx in np.arange(x + step / 3, x + bw - step / 3, step):
                for wy in np.arange(top + step / 3, horizon - step / 2, step):
                    draw.rectangle([wx, wy, wx + step / 2.5, wy + step / 2.5], fill=win)
            x += bw
    if kind in ("plaza", "street"):  # paving lines converging to a vanishing point on the horizon
        col = _rgb(0, 0, rng.uniform(0.2, 0.9))
        vx = rng.uniform(0.2, 0.8) * w
        for k in range(int(rng.integers(6, 16))):
            bx = (k / 8.0 - 0.4) * 3 * w
            draw.line([(vx, max(horizon, 0)), (bx, h)], fill=col, width=1)
        d = 1.0
        while True:
            y = horizon + (h - horizon) / d
            if y <= max(horizon, 0) + 2:
                break
            draw.line([(0, y), (w, y)], fill=col, width=1)
            d *= rng.uniform(1.15, 1.5)
    arr = np.asarray(pil).astype(np.float32)
    if kind in ("grass", "noise"):
        arr += _smooth_noise(rng, h, w, int(rng.integers(4, 12)), rng.uniform(6, 20))
    arr += _smooth_noise(rng, h, w, 4, rng.uniform(5, 25))
    arr += rng.normal(0, rng.uniform(1, 6), size=arr.shape).astype(np.float32)
    pil = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(0, 7))):  # distractors: boxes, poles and round blobs that are not heads
        cx, cy = rng.uniform(0, w), rng.uniform(max(horizon, 0), h)
        size = rng.uniform(0.02, 0.12) * w * (cy - horizon) / max(h - horizon, 1)
        col = _rgb(rng.uniform(0, 1), rng.uniform(0.2, 1), rng.uniform(0.2, 1))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.rectangle([cx - size, cy - size * 0.6, cx + size, cy], fill=col)
        elif shape == 1:
            draw.rectangle([cx - size * 0.08, cy - size * 3, cx + size * 0.08, cy], fill=col)
            draw.ellipse([cx - size * 0.3, cy - size * 3.3, cx + size * 0.3, cy - size * 2.7], fill=col)
        else:
            draw.ellipse([cx - size * 0.4, cy - size * 0.8, cx + size * 0.4, cy], fill=col)
    return pil


def _sample_feet(rng: np.random.Generator, n: int, h: int, w: int, horizon: float, near_height: float,
                 min_height: float) -> np.ndarray:
    """Foot positions ``[n, 2]`` (x, y): a mix of a uniform spread and clusters, denser far away."""
    y_near = h + 0.35 * near_height  # people whose feet are below the frame still show their heads
    slope = near_height / (h - horizon)
    # No one farther than where figures shrink to min_height (their heads would be sub-pixel).
    y_far = min(max(horizon + min_height / slope, horizon + 1.0, 0.0), y_near - 1.0)
    depth_power = rng.uniform(0.0, 1.5)  # > 0 puts more people far away, where they are smaller
    u = rng.uniform(0, 1, n) ** (1.0 + depth_power)
    ys = y_far + u * (y_near - y_far)
    xs = rng.uniform(-0.05 * w, 1.05 * w, n)
    n_clusters = int(rng.integers(0, 5))
    if n_clusters:
        member = rng.uniform(0, 1, n) < rng.uniform(0.2, 0.8)
        centres = np.stack([rng.uniform(0, w, n_clusters), rng.uniform(y_far, y_near, n_clusters)], -1)
        which = rng.integers(0, n_clusters, n)
        spread = rng.uniform(0.05, 0.2) * w
        # Cluster spread shrinks with distance (perspective).
        scale = np.clip((centres[which, 1] - horizon) / max(h - horizon, 1.0), 0.1, 1.5)
        cx = centres[which, 0] + rng.normal(0, 1, n) * spread * scale
        cy = centres[which, 1] + rng.normal(0, 1, n) * spread * 0.4 * scale
        xs = np.where(member, cx, xs)
        ys = np.where(member, np.clip(cy, y_far, y_near), ys)
    return np.stack([xs, ys], -1)


def generate_crowd(rng: np.random.Generator, spec: CrowdSpec = CrowdSpec()) -> tuple[Image.Image, np.ndarray]:
    """Draw one synthetic crowd.

    Args:
        rng: numpy generator (the image is a pure function of its state).
        spec: image size and count range.

    Returns:
        ``(image, points)``: an RGB PIL image of ``spec.height × spec.width`` and the annotated heads
        ``[N, 2]`` float (x, y) in pixels, all inside the image.
    """
    ss = spec.supersample
    h, w = spec.height * ss, spec.width * ss
    n = int(round(math.exp(rng.uniform(math.log(spec.count_min), math.log(spec.count_max + 1))))) - 0
    n = int(np.clip(n, spec.count_min, spec.count_max))
    horizon = rng.uniform(-0.8, 0.35) * h
    # Denser crowds are seen from farther away: smaller people.
    min_height = spec.min_person * ss
    near_height = h * rng.uniform(0.4, 1.0) * spec.max_person * float(np.clip((25.0 / n) ** 0.3, 0.3, 1.0))
    near_height = max(near_height, 1.5 * min_height)
    slope = near_height / (h - horizon)  # figure height per pixel below the horizon

    canvas = _background(rng, h, w, horizon)
    draw = ImageDraw.Draw(canvas)
    ids = Image.new("I", (w, h), 0)
    id_draw = ImageDraw.Draw(ids)

    feet = _sample_feet(rng, n, h, w, horizon, near_height, min_height)
    feet = feet[np.argsort(feet[:, 1], kind="stable")]  # far (small y) first: near people occlude them
    heads = np.zeros((n, 2), np.float64)
    radii = np.zeros(n, np.float64)
    palette_shift = rng.uniform(0, 1)
    for i, (fx, fy) in enumerate(feet):
        pid = i + 1
        ph = max(slope * (fy - horizon), min_height)  # figure height
        pw = ph * rng.uniform(0.24, 0.34)
        r = ph * rng.uniform(0.075, 0.095)  # head radius
        hx = fx + rng.normal(0, 0.03) * ph
        hy = fy - ph + r
        heads[i] = (hx, hy)
        radii[i] = r
        shirt = _rgb(palette_shift + rng.uniform(0, 1), rng.uniform(0.2, 0.95), rng.uniform(0.15, 0.95))
        trousers = _rgb(rng.uniform(0, 1), rng.uniform(0, 0.5), rng.uniform(0.05, 0.5))
        skin = _rgb(rng.uniform(0.02, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95))
        hair = _rgb(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.8), rng.uniform(0.05, 0.45))
        torso_top, hip = hy + r * 1.05, fy - ph * 0.47
        shapes = [
            ("rect", [fx - pw * 0.38, hip, fx - pw * 0.05, fy], trousers),  # legs
            ("rect", [fx + pw * 0.05, hip, fx + pw * 0.38, fy], trousers),
            ("ellipse", [fx - pw / 2, torso_top, fx + pw / 2, hip + ph * 0.05], shirt),  # torso
        ]
        if rng.uniform() < 0.7:  # arms
            arm = pw * 0.16
            shapes += [("rect", [fx - pw / 2 - arm * 0.6, torso_top + r * 0.3, fx - pw / 2 + arm * 0.4, hip], shirt),
                       ("rect", [fx + pw / 2 - arm * 0.4, torso_top + r * 0.3, fx + pw / 2 + arm * 0.6, hip], shirt)]
        shapes.append(("ellipse", [hx - r * 0.9, hy - r, hx + r * 0.9, hy + r], skin))  # head
        style = rng.uniform()
        if style < 0.6:  # hair on the top half
            shapes.append(("pieslice", [hx - r * 0.95, hy - r * 1.05, hx + r * 0.95, hy + r * 0.6], hair))
        elif style < 0.75:  # hat
            hat = _rgb(rng.uniform(0, 1), rng.uniform(0.3, 1), rng.uniform(0.2, 1))
            shapes.append(("rect", [hx - r * 1.3, hy - r * 0.55, hx + r * 1.3, hy - r * 0.35], hat))
            shapes.append(("rect", [hx - r * 0.8, hy - r * 1.3, hx + r * 0.8, hy - r * 0.4], hat))
        for kind, box, col in shapes:
            if kind == "rect":
                draw.rectangle(box, fill=col)
                id_draw.rectangle(box, fill=pid)
            elif kind == "ellipse":
                draw.ellipse(box, fill=col)
                id_draw.ellipse(box, fill=pid)
            else:
                draw.pieslice(box, 180, 360, fill=col)
                id_draw.pieslice(box, 180, 360, fill=pid)

    # Visibility of each head in the ID map (supersampled resolution).
    id_arr = np.asarray(ids)
    keep = np.zeros(n, bool)
    for i in range(n):
        hx, hy = heads[i]
        r = radii[i]
        if not (0 <= hx < w and 0 <= hy < h):
            continue
        x0, x1 = int(max(math.floor(hx - r), 0)), int(min(math.ceil(hx + r) + 1, w))
        y0, y1 = int(max(math.floor(hy - r), 0)), int(min(math.ceil(hy + r) + 1, h))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        inside = ((xx + 0.5 - hx) / max(r * 0.9, 0.5)) ** 2 + ((yy + 0.5 - hy) / max(r, 0.5)) ** 2 <= 1.0
        total = int(inside.sum())
        if total == 0:  # sub-pixel head: judge by its centre pixel
            keep[i] = id_arr[int(hy), int(hx)] == i + 1
            continue
        visible = int((inside & (id_arr[y0:y1, x0:x1] == i + 1)).sum())
        keep[i] = visible >= spec.min_visible * total

    img = canvas.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.0, 0.6) * ss))
    img = img.resize((spec.width, spec.height), Image.LANCZOS)
    arr = np.asarray(img).astype(np.float32)
    arr = arr * rng.uniform(0.75, 1.2) + rng.uniform(-20, 20)  # exposure
    arr += rng.normal(0, rng.uniform(0.5, 4), size=arr.shape)  # sensor noise
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    points = heads[keep] / ss
    return img, points.astype(np.float64)


def write_crowd_dataset(root: str | Path, num_train: int, num_test: int, spec: CrowdSpec = CrowdSpec(),
                        seed: int = 0) -> Path:
    """Generate ``root/train`` and ``root/test`` in vkd's generic format (idempotent).

    ``root/meta.json`` records the parameters and is written last, so an interrupted generation is
    redone and an existing complete one with the same parameters is reused.

    Args:
        root: output directory.
        num_train: training images.
        num_test: test images (independent random stream).
        spec: image size and count range.
        seed: base seed; image ``i`` of split ``s`` uses ``SeedSequence([seed, s, i])``.

    Returns:
        ``root``.
    """
    root = Path(root)
    meta = {"format": _FORMAT_VERSION, "num_train": num_train, "num_test": num_test, "seed": seed, **asdict(spec)}
    meta_path = root / "meta.json"

    def ready() -> bool:
        try:
            return json.loads(meta_path.read_text()) == meta
        except (OSError, ValueError):
            return False

    def build() -> None:
        for split_id, (split, num) in enumerate((("train", num_train), ("test", num_test))):
            out = root / split
            out.mkdir(parents=True, exist_ok=True)
            for old in list(out.glob("img_*")):
                old.unlink()
            for i in range(num):
                rng = np.random.default_rng(np.random.SeedSequence([seed, split_id, i]))
                image, points = generate_crowd(rng, spec)
                image.save(out / f"img_{i:05d}.png")
                # Rounded for a compact file, kept strictly inside the image (95.9996 must not become 96.0).
                points = np.minimum(np.round(points, 3), [spec.width - 1e-3, spec.height - 1e-3])
                (out / f"img_{i:05d}.json").write_text(json.dumps({"points": points.tolist()}))
        atomic_write_text(meta_path, json.dumps(meta, indent=1))

    build_once(root, ready, build)  # a concurrent process waits, then reuses the finished set
    return root
