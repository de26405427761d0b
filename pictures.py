"""Small plots drawn and encoded fast enough to log every epoch: the gradient flow and the confusion matrix.

Three things dominate the cost of such a picture with PIL, and each is paid less here: rendering text (about
0.1 ms per label, so a 10-class confusion matrix spent 13 ms on its numbers), paid once per label and pasted
from a cache; PNG's adaptive row filter, which tries five filters on every row (4-7 ms for a 600 x 500 plot,
more than the compression), replaced by one filter for every row; and compressing three bytes a pixel, where a
plot of a few colours needs one (Picture, a palette image).
"""
import copy
import functools
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BLACK = (0, 0, 0)


@functools.lru_cache(maxsize=None)
def font():
    return ImageFont.load_default(size=12)


@functools.lru_cache(maxsize=4096)
def text_mask(text, anchor):
    """(left, top, mask): `text` rendered once as an 8-bit coverage mask, placed relative to its anchor point."""
    left, top, right, bottom = font().getbbox(text, anchor=anchor)
    mask = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=font(), anchor=anchor)
    return left, top, mask


WHITE = (255, 255, 255)
SHADES = 16  # steps of a text colour's antialiasing in a Picture, unless it says otherwise


def shade_levels(coverage, shades):
    """8-bit text coverage rounded to `shades` levels (0: nothing, `shades`: full), the steps a Picture's text is
    drawn in: level k is palette index shade(colour, ground) + k - 1."""
    return np.round(np.asarray(coverage) * (shades / 255)).astype(np.uint8)


@functools.lru_cache(maxsize=None)
def _shade_tables(first, shades):
    """Lookup tables from 8-bit coverage to palette indices first .. first + shades - 1, and to a mask."""
    levels = shade_levels(np.arange(256), shades).tolist()
    return [first + max(level - 1, 0) for level in levels], [255 if level else 0 for level in levels]


@functools.lru_cache(maxsize=4096)
def _text_stamp(text, anchor, first, shades):
    """(left, top, stamp, mask) for a palette image: the coverage rounded to `shades` levels, as indices
    first .. first + shades - 1 (faint to full), and a mask of the pixels with a level above zero."""
    left, top, coverage = text_mask(text, anchor)
    to_index, to_mask = _shade_tables(first, shades)
    stamp = Image.frombytes("P", coverage.size, coverage.point(to_index).tobytes())
    return left, top, stamp, coverage.point(to_mask)


@functools.lru_cache(maxsize=16)
def _palette(colors, text, shades):
    """(palette, {colour: first index}, {(colour, ground): first shade's index}, palette as bytes) of a Picture."""
    palette = [WHITE, *colors]
    index = {}
    for i, color in enumerate(palette):
        index.setdefault(color, i)
    first = {}
    for color, ground in text:
        first[color, ground] = len(palette)
        palette += [tuple(round(g + (c - g) * (k + 1) / shades) for g, c in zip(ground, color)) for k in range(shades)]
    if len(palette) > 256:
        raise ValueError(f"a Picture holds at most 256 colours, these need {len(palette)}")
    return palette, index, first, bytes(channel for color in palette for channel in color)


class Picture:
    """A white picture drawn in a few colours, kept as palette indices: a third of RGB's bytes to compress.
    Text is antialiased in `shades` blends of its colour with the colour it is written on: `text` lists the
    (colour, ground) pairs the picture uses. At most 256 colours in all."""

    def __init__(self, width, height, colors, text=((BLACK, WHITE),), shades=SHADES):
        self.palette, self._index, self._first, flat = _palette(tuple(colors), tuple(text), shades)
        self._shades = shades
        self.image = Image.new("P", (width, height), 0)
        self.image.putpalette(flat)
        self._draw = ImageDraw.Draw(self.image)
        self._png = None

    def index(self, color):
        """The palette index of one of the picture's colours."""
        return self._index[color]

    def shade(self, color, ground=WHITE):
        """The palette index of the first (faintest) of the shades of `color` written on `ground`."""
        return self._first[color, ground]

    def copy(self):
        """A picture holding this one's drawing, to draw on further."""
        other = copy.copy(self)
        other.image = self.image.copy()
        other._draw = ImageDraw.Draw(other.image)
        return other

    def line(self, xy, color):
        self._png = None
        self._draw.line(xy, fill=self._index[color])

    def rectangle(self, box, color):
        self._png = None
        self._draw.rectangle(box, fill=self._index[color])

    def put(self, indices, xy):
        """Put an (H, W) array of palette indices with its top left corner at xy."""
        self._png = None
        indices = np.ascontiguousarray(indices, dtype=np.uint8)
        self.image.paste(Image.frombytes("P", indices.shape[::-1], indices.tobytes()), xy)

    def text(self, xy, text, color, anchor="la", ground=WHITE):
        """ImageDraw.text(xy, text, color, font(), anchor) on a ground of one colour, from a cache of rendered
        labels: xy rounded to whole pixels, the coverage to the picture's shades."""
        self._png = None
        left, top, stamp, mask = _text_stamp(text, anchor, self._first[color, ground], self._shades)
        self.image.paste(stamp, (round(xy[0]) + left, round(xy[1]) + top), mask)

    @property
    def shape(self):
        return self.image.height, self.image.width

    def rgb(self):
        """The picture as an (H, W, 3) uint8 array."""
        return np.asarray(self.image.convert("RGB"))

    def png(self):
        """The picture as PNG bytes, encoded once until it is drawn on again."""
        if self._png is None:
            self._png = encode_png(np.asarray(self.image), self.palette)
        return self._png


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_png(array, palette=None):
    """An (H, W, 3) uint8 array, or (H, W) indices into `palette` (a list of RGB tuples), as PNG bytes. Every row
    uses the Up filter (the difference to the row above), which turns a plot's flat areas into zeros for zlib:
    the size of PIL's adaptive choice at a third of its time."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    channels = 3 if palette is None else 1
    if array.ndim != (3 if channels == 3 else 2) or array.shape[2:] not in ((), (3,)) or 0 in array.shape:
        raise ValueError("an image must be a non-empty (H, W, 3) uint8 array, or (H, W) with a palette; "
                         f"got shape {array.shape}")
    height, width = array.shape[:2]
    flat = array.reshape(height, width * channels)
    rows = np.empty((height, 1 + width * channels), dtype=np.uint8)
    rows[:, 0] = 2  # filter type Up
    rows[0, 1:] = flat[0]
    np.subtract(flat[1:], flat[:-1], out=rows[1:, 1:])  # uint8 wraps around, as the filter's byte arithmetic does
    color_type = 2 if palette is None else 3  # RGB, or palette indices
    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)  # 8 bits; deflate; filters; no interlace
    colors = b"" if palette is None else _chunk(b"PLTE", bytes(channel for color in palette for channel in color))
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + colors + _chunk(b"IDAT", zlib.compress(rows, 1))
            + _chunk(b"IEND", b""))
