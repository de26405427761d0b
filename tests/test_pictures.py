import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from pictures import BLACK, SHADES, Picture, encode_png, font, text_mask


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (37, 53, 3)])
def test_png_decodes_to_the_same_pixels(shape):
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 256, shape, dtype=np.uint8)  # rows that differ by more than 127 wrap around in Up
    decoded = Image.open(io.BytesIO(encode_png(array)))
    assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
    assert np.array_equal(np.asarray(decoded), array)


def test_png_of_a_plot_is_no_larger_than_pils():
    image = Image.new("RGB", (400, 300), "white")
    draw = ImageDraw.Draw(image)
    for i in range(8):
        draw.rectangle([20 + 45 * i, 280 - 30 * i, 50 + 45 * i, 290], fill=(33, 113, 181))
        draw.text((20 + 45 * i, 5), f"layer{i}", fill="black")
    pil = io.BytesIO()
    image.save(pil, format="PNG", compress_level=1)
    assert len(encode_png(np.asarray(image))) <= 1.1 * len(pil.getvalue())


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (8, 1), (40, 31)])
def test_palette_png_decodes_to_the_same_indices_and_colours(shape):
    rng = np.random.default_rng(sum(shape))
    palette = [tuple(int(c) for c in rng.integers(0, 256, 3)) for _ in range(37)]
    indices = rng.integers(0, len(palette), shape, dtype=np.uint8)
    decoded = Image.open(io.BytesIO(encode_png(indices, palette)))
    assert decoded.mode == "P" and np.array_equal(np.asarray(decoded), indices)
    assert np.array_equal(np.asarray(decoded.convert("RGB")), np.array(palette, dtype=np.uint8)[indices])


@pytest.mark.parametrize("shape, palette", [((4, 4), None), ((4, 4, 4), None), ((0, 4, 3), None),
                                            ((4, 4, 3), [(0, 0, 0)]), ((0, 4), [(0, 0, 0)])])
def test_png_refuses_what_is_not_an_rgb_or_palette_picture(shape, palette):
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        encode_png(np.zeros(shape, dtype=np.uint8), palette)


def test_picture_draws_what_pil_draws_in_rgb_with_text_shades_rounded():
    blue = (33, 113, 181)
    picture = Picture(120, 60, [BLACK, blue])
    picture.rectangle([10, 30.4, 30, 55], blue)
    picture.line([(0, 25), (119, 25)], BLACK)
    picture.text((5, 3), "fc1 1e-3", BLACK)
    expected = Image.new("RGB", (120, 60), "white")
    draw = ImageDraw.Draw(expected)
    draw.rectangle([10, 30.4, 30, 55], fill=blue)
    draw.line([(0, 25), (119, 25)], fill=BLACK)
    draw.text((5, 3), "fc1 1e-3", fill=BLACK, font=font())
    drawn, want = picture.rgb().astype(int), np.asarray(expected).astype(int)
    assert np.abs(drawn - want).max() <= 255 / (2 * SHADES) + 1  # text shading only, to the nearest level
    assert np.array_equal(drawn[20:], want[20:])  # shapes exactly
    assert len({tuple(px) for px in drawn[:20].reshape(-1, 3)}) > 3  # antialiased, not two-tone
    png = Image.open(io.BytesIO(picture.png()))
    assert np.array_equal(np.asarray(png.convert("RGB")), picture.rgb())


@pytest.mark.parametrize("anchor", ["la", "mb", "rm", "mm"])
@pytest.mark.parametrize("text", ["conv1", "Confusion_Matrix_valid: rows", "42", "1e-7"])
def test_cached_text_masks_are_what_imagedraw_draws(text, anchor):
    background = Image.linear_gradient("L").resize((200, 40)).convert("RGB")  # blending shows on grey too
    expected, drawn = background.copy(), background.copy()
    ImageDraw.Draw(expected).text((100, 20), text, fill=(255, 0, 0), font=font(), anchor=anchor)
    for _ in range(2):  # the second time from the cache
        drawn = background.copy()
        left, top, mask = text_mask(text, anchor)
        drawn.paste((255, 0, 0), (100 + left, 20 + top), mask)
    assert not np.array_equal(np.asarray(expected), np.asarray(background))
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))


def test_picture_text_on_a_coloured_ground_blends_with_that_ground():
    grey, red = (64, 64, 64), (255, 0, 0)
    picture = Picture(60, 30, [grey], text=[(red, grey)], shades=6)
    picture.rectangle([0, 0, 59, 29], grey)
    picture.text((30, 15), "173", red, anchor="mm", ground=grey)
    expected = Image.new("RGB", (60, 30), grey)
    ImageDraw.Draw(expected).text((30, 15), "173", fill=red, font=font(), anchor="mm")
    difference = np.abs(picture.rgb().astype(int) - np.asarray(expected).astype(int))
    assert difference.max() <= 255 / (2 * 6) + 1
    assert len({tuple(px) for px in picture.rgb().reshape(-1, 3)}) > 3  # shades between grey and red


def test_picture_png_follows_later_drawing():
    picture = Picture(20, 10, [BLACK])
    first = picture.png()
    assert picture.png() is first  # encoded once
    picture.rectangle([2, 2, 5, 5], BLACK)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(picture.png())).convert("RGB")), picture.rgb())
    assert picture.png() != first


def test_picture_refuses_more_than_256_colours():
    with pytest.raises(ValueError, match="256 colours"):
        Picture(4, 4, [(i, i, i) for i in range(200)], text=[(BLACK, (i, i, i)) for i in range(5)])
