"""Printed digits: the public pretraining data of the embedded default's tiny CLIP.

The embedded default needs a CLIP that plays a *public* foundation model: trained without the target task's
labelled images, so that its zero-shot classifier is a weaker label source than the task's teacher and the LoRA
fit has something to close. vkd renders the ten digits from the TrueType fonts that ship with matplotlib (DejaVu,
STIX, Computer Modern: printed glyphs, not handwriting), each with a random affine jitter and stroke width, white on
black like scikit-learn's digits, and pretrains the tiny CLIP on them with the captions
``"a photo of the digit seven."`` (the prompt template and the class names; no image of the target set is used).
The target task, scikit-learn's *handwritten* 8×8 digits, is a domain shift away from them.

The rendering is deterministic for a seed and a matplotlib version (the fonts); the tiny CLIP's cache key hashes
the rendered images, so other fonts or another recipe give another cache entry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vkd.data.digits import DIGIT_NAMES
from vkd.errors import DataError

__all__ = ["PrintedDigits", "PRINTED_DIGIT_FONTS", "digit_fonts", "render_printed_digits"]

# matplotlib's bundled fonts that draw the ten digits as ordinary glyphs (cmmi10 and the STIX size variants do not)
PRINTED_DIGIT_FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf", "DejaVuSansMono-BoldOblique.ttf",
    "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSerif-BoldItalic.ttf",
    "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf",
)

_CANVAS = 64  # glyphs are drawn (font size 40) and placed at this size, then shrunk with antialiasing


@dataclass
class PrintedDigits:
    """Rendered digits: ``images`` ``[N, 3, S, S]`` float in [0, 1] (white on black), ``labels`` ``[N]`` (0-9) and
    ``fonts`` ``[N]`` (index into ``font_names``)."""

    images: torch.Tensor
    labels: torch.Tensor
    fonts: torch.Tensor
    font_names: tuple[str, ...]
    class_names: tuple[str, ...] = DIGIT_NAMES


def digit_fonts(names: tuple[str, ...] | list[str] = PRINTED_DIGIT_FONTS) -> list[Path]:
    """Paths of matplotlib's bundled TrueType fonts named ``names`` (those present)."""
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    return [root / n for n in names if (root / n).is_file()]


def _glyph(font, digit: int, stroke: int) -> np.ndarray:
    """One digit drawn white on a black ``_CANVAS`` square, cropped to its ink box (float32 in [0, 1])."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (_CANVAS * 2, _CANVAS * 2), 0)
    ImageDraw.Draw(img).text((_CANVAS, _CANVAS), str(digit), fill=255, font=font, anchor="mm", stroke_width=stroke,
                             stroke_fill=255)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    rows, cols = np.nonzero(arr > 0.05)
    return arr[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _place(glyph: np.ndarray, size: int, rng: np.random.Generator, rotate: float, fill: tuple[float, float]
           ) -> torch.Tensor:
    """Rotate the glyph, fit its box (aspect kept) to a random fraction of the frame, shift it a little and shrink
    it to ``size`` px: ``[size, size]``."""
    h, w = glyph.shape
    side = max(h, w)
    pad = np.zeros((side * 2, side * 2), dtype=np.float32)
    pad[side - h // 2:side - h // 2 + h, side - w // 2:side - w // 2 + w] = glyph
    x = torch.from_numpy(pad)[None, None]
    angle = math.radians(rng.uniform(-rotate, rotate))
    frac = rng.uniform(*fill)  # the glyph's taller side as a fraction of the frame
    scale = 0.5 / frac  # the glyph spans half the padded canvas; affine_grid maps the output frame into it
    shift = rng.uniform(-0.08, 0.08, size=2)
    cos, sin = math.cos(angle) * scale, math.sin(angle) * scale
    theta = torch.tensor([[[cos, -sin, shift[0]], [sin, cos, shift[1]]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, 1, _CANVAS, _CANVAS], align_corners=False)  # sampled large, then shrunk
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = F.interpolate(out, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].clamp(0, 1)


def render_printed_digits(per_font: int = 16, size: int = 16, seed: int = 0, rotate: float = 12.0,
                          fill: tuple[float, float] = (0.7, 0.95), max_stroke: int = 2,
                          fonts: tuple[str, ...] | list[str] = PRINTED_DIGIT_FONTS) -> PrintedDigits:
    """Render ``per_font`` jittered copies of each digit in each font.

    Args:
        per_font: copies per (digit, font) pair, each with its own rotation, size, shift and stroke width.
        size: output side in pixels.
        seed: the jitter's seed.
        rotate: rotation range in degrees (uniform in ``[-rotate, rotate]``).
        fill: range of the glyph's taller side as a fraction of the frame.
        max_stroke: extra stroke width in canvas pixels (uniform in ``0 … max_stroke``; thicker strokes).
        fonts: font file names among matplotlib's bundled fonts.

    Returns:
        :class:`PrintedDigits` with ``10 × len(fonts) × per_font`` images ``[N, 3, size, size]``.

    Raises:
        DataError: none of the fonts is found.
    """
    from PIL import ImageFont

    paths = digit_fonts(fonts)
    if not paths:
        raise DataError(f"none of the fonts {list(fonts)[:3]}... is in matplotlib's font folder; cannot render the "
                        "printed digits the tiny CLIP is pretrained on")
    rng = np.random.default_rng(seed)
    images, labels, font_ids = [], [], []
    for fi, path in enumerate(paths):
        font = ImageFont.truetype(str(path), size=_CANVAS // 2 + 8)
        for digit in range(10):
            glyphs = {}
            for _ in range(per_font):
                stroke = int(rng.integers(0, max_stroke + 1))
                if stroke not in glyphs:
                    glyphs[stroke] = _glyph(font, digit, stroke)
                images.append(_place(glyphs[stroke], size, rng, rotate, fill))
                labels.append(digit)
                font_ids.append(fi)
    x = torch.stack(images)[:, None].repeat(1, 3, 1, 1).contiguous()
    return PrintedDigits(x, torch.tensor(labels), torch.tensor(font_ids), tuple(p.name for p in paths))
