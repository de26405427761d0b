"""The pictures the monitor logs, drawn with PIL: the gradient flow and the confusion matrix.

TensorBoard's image cards show a picture up to about 330 pixels wide as it is, and shrink a wider
one by dropping pixel columns, which erases parts of thin text; so these pictures stay that narrow
for a small model (wider ones read well with "Show actual image size").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLACK = (0, 0, 0)
WHITE = (255, 255, 255)
RED = (255, 0, 0)
GRID = (225, 225, 225)
LIGHT_BLUE = (158, 202, 225)
DARK_BLUE = (33, 113, 181)
# the gradient-flow picture's layout, in pixels: a slot per layer, the margins, the plot's height
SLOT = 52
LEFT = 46
TOP = 46
HEIGHT = 240
BOTTOM = 50
LINE = 15  # pixels from one line of text to the next
OUTLINE = 230  # the grey between confusion-matrix cells


@functools.cache
def font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=12)


def _canvas(width: int, height: int, title: list[str]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A white picture at least as wide as its title, with the title's lines at the top left."""
    width = max(width, *(math.ceil(font().getlength(line)) + 16 for line in title))
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    for i, line in enumerate(title):
        draw.text((8, 6 + LINE * i), line, BLACK, font())
    return image, draw


def gradient_flow_image(
    names: Sequence[str], means: Sequence[float], maxes: Sequence[float], epoch: int
) -> Image.Image:
    """Bars of each weight layer's mean (dark) and max (light) |gradient| on a log scale, input side
    on the left: vanishing gradients show as bars that shrink towards the left."""
    title = [f"Gradient flow, epoch {epoch + 1}", "mean |grad| (dark), max |grad| (light)"]
    image, draw = _canvas(LEFT + SLOT * max(len(names), 1) + 12, TOP + HEIGHT + BOTTOM, title)
    right = image.width - 8
    positive = [v for v in [*means, *maxes] if v > 0 and math.isfinite(v)]
    if not positive:
        draw.text((LEFT, TOP + HEIGHT // 2), "no finite, non-zero gradients", RED, font())
        return image
    low = math.floor(math.log10(min(positive)))
    high = max(math.ceil(math.log10(max(positive))), low + 1)

    def y(value: float) -> float:
        return TOP + HEIGHT - (math.log10(value) - low) / (high - low) * HEIGHT

    for power in range(low, high + 1):
        draw.line([(LEFT - 4, y(10.0**power)), (right, y(10.0**power))], GRID)
        draw.text((6, y(10.0**power) - 7), f"1e{power}", BLACK, font())
    draw.line([(LEFT, TOP), (LEFT, TOP + HEIGHT), (right, TOP + HEIGHT)], BLACK)
    for i, (name, mean, peak) in enumerate(zip(names, means, maxes)):
        _bars(draw, LEFT + i * SLOT + 6, name, [peak, mean], y)
    return image


def _bars(draw: ImageDraw.ImageDraw, x: int, name: str, values: list[float], y) -> None:
    """One layer's bars at `x` (its max |grad| light, its mean dark) and its name below them."""
    for offset, value, colour in ((0, values[0], LIGHT_BLUE), (20, values[1], DARK_BLUE)):
        if value > 0 and math.isfinite(value):  # zero and non-finite values have no bar
            draw.rectangle([x + offset, y(value), x + offset + 18, TOP + HEIGHT], colour)
    for row, part in enumerate(name.split(".")[:3]):  # "layer1.0.conv1.weight" in short lines
        draw.text((x, TOP + HEIGHT + 4 + 14 * row), part[:7], BLACK, font())


def row_shares(confusion_mat: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix divided by its total (0 for a class without samples)."""
    confusion_mat = np.asarray(confusion_mat, dtype=np.float64)
    totals = confusion_mat.sum(axis=1, keepdims=True)
    return np.divide(confusion_mat, totals, out=np.zeros_like(confusion_mat), where=totals > 0)


def _upright(text: str) -> Image.Image:
    """`text` in black on white, turned to read upwards (a column's or an axis's name)."""
    width = math.ceil(font().getlength(text)) + 2
    strip = Image.new("RGB", (width, LINE), WHITE)
    ImageDraw.Draw(strip).text((1, 0), text, BLACK, font())
    return strip.rotate(90, expand=True)


def confusion_matrix_image(
    confusion_mat: np.ndarray, classes: Sequence[str], set_name: str
) -> Image.Image:
    """Rows are true classes, columns predictions, each named by its class (the first 14
    characters), the axes "true" and "predicted". A cell's grey is its share of the row (black:
    all of it); its count is written in red where counts fit in the cells (up to 30 classes)."""
    counts = np.asarray(confusion_mat)
    n = len(classes)
    cell = max(16, min(26, 260 // max(n, 1)))
    names = [str(c)[:14] for c in classes]
    longest = max((math.ceil(font().getlength(name)) for name in names), default=0)
    left = 2 * LINE + 8 + longest  # the axis name, then the row names
    top = 2 * LINE + 12 + LINE + longest  # the title, the axis name, then the column names
    title = [f"Confusion matrix, {set_name}", "a row's grey: its share of that true class"]
    image, draw = _canvas(left + n * cell + 8, top + n * cell + 8, title)

    greys = np.round(255 * (1 - row_shares(counts))).astype(np.uint8)
    greys = greys.repeat(cell, 0).repeat(cell, 1)
    for edge in (0, cell - 1):  # each cell's outline
        greys[edge::cell] = OUTLINE
        greys[:, edge::cell] = OUTLINE
    image.paste(Image.fromarray(greys).convert("RGB"), (left, top))
    draw.text((left + n * cell / 2, top - longest - 6), "predicted", BLACK, font(), anchor="mb")
    axis = _upright("true")
    image.paste(axis, (6, top + (n * cell - axis.height) // 2))
    fits = n <= 30 and font().getlength(str(counts.max(initial=0))) <= cell - 2
    for i in range(n):
        column = _upright(names[i])
        image.paste(column, (left + i * cell + (cell - column.width) // 2, top - 3 - column.height))
        draw.text((left - 6, top + i * cell + cell // 2), names[i], BLACK, font(), anchor="rm")
        for j in range(n if fits else 0):
            draw.text(
                (left + j * cell + cell / 2, top + i * cell + cell / 2),
                str(counts[i, j]),
                RED,
                font(),
                anchor="mm",
            )
    return image
