"""The gradient-flow and confusion-matrix pictures: what they show, and their text drawn whole."""

import numpy as np
import pytest
from PIL import Image, ImageDraw

from gradwatch.pictures import DARK_BLUE, LEFT, LINE, SLOT, confusion_matrix_image, font, gradient_flow_image


def title_is_drawn_whole(image, *lines):
    """The picture's title strip equals the title's lines drawn alone by ImageDraw on a white canvas as wide as
    the picture: nothing clipped at the right edge, nothing drawn over them."""
    height = 6 + LINE * len(lines)
    expected = Image.new("RGB", (image.width, height), "white")
    for i, line in enumerate(lines):
        ImageDraw.Draw(expected).text((8, 6 + LINE * i), line, (0, 0, 0), font())
    return np.array_equal(np.asarray(image)[:height], np.asarray(expected))


@pytest.mark.parametrize("layers", [1, 2, 12])
def test_gradient_flow_title_is_drawn_whole_whatever_the_number_of_layers(layers):
    names = [f"layer{i}.weight" for i in range(layers)]
    image = gradient_flow_image(names, [1e-3] * layers, [1e-2] * layers, epoch=19)
    assert title_is_drawn_whole(image, "Gradient flow, epoch 20", "mean |grad| (dark), max |grad| (light)")
    assert image.width >= LEFT + SLOT * layers


def bar_top(image, layer):
    """The highest row of a layer's dark (mean) bar."""
    column = np.asarray(image)[:, LEFT + layer * SLOT + 6 + 29]
    rows = np.flatnonzero((column == DARK_BLUE).all(axis=1))
    return rows.min() if rows.size else None


def test_gradient_flow_bars_rise_with_the_gradient_on_a_log_scale():
    names = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    image = gradient_flow_image(names, [1e-6, 1e-4, 1e-2, 0.0], [1e-5, 1e-3, 1e-1, 0.0], epoch=0)
    tops = [bar_top(image, i) for i in range(4)]
    assert tops[0] > tops[1] > tops[2] and tops[3] is None  # a zero gradient draws no bar
    assert abs((tops[0] - tops[1]) - (tops[1] - tops[2])) <= 1  # equal steps for equal factors


def test_gradient_flow_without_usable_gradients_says_so():
    image = np.asarray(gradient_flow_image(["a.weight"], [float("nan")], [0.0], epoch=0))
    assert ((image[..., 0] > 200) & (image[..., 1] < 80)).sum() > 20  # the red note


def test_confusion_matrix_cells_are_grey_by_row_share_with_red_counts():
    image = np.asarray(confusion_matrix_image(np.array([[3, 1], [0, 4]]), ["cat", "dog"], "valid"))
    greys = {tuple(px) for px in image.reshape(-1, 3) if px[0] == px[1] == px[2]}
    for share in (0.75, 0.25, 0.0, 1.0):  # every row-normalised share is a cell's grey level
        level = round(255 * (1 - share))
        assert (level, level, level) in greys
    title = "Confusion matrix, valid", "a row's grey: its share of that true class"
    assert title_is_drawn_whole(Image.fromarray(image), *title)
    assert ((image[..., 0] > 200) & (image[..., 1] < 100)).sum() > 4 * 5  # four counts in red


def test_confusion_matrix_names_rows_and_columns_by_class_alone_and_its_axes(monkeypatch):
    drawn = []
    text = ImageDraw.ImageDraw.text
    monkeypatch.setattr(
        ImageDraw.ImageDraw, "text", lambda self, xy, s, *a, **k: drawn.append(s) or text(self, xy, s, *a, **k)
    )
    classes = ["0", "airplane", "class one"]
    image = confusion_matrix_image(np.array([[3, 1, 2], [2, 4, 2], [1, 1, 5]]), classes, "valid")  # no count reads "0"
    labels = [s for s in drawn if not s.isdigit() or s in classes]  # the counts aside
    title = ["Confusion matrix, valid", "a row's grey: its share of that true class"]
    assert sorted(labels) == sorted([*title, "predicted", "true", *classes, *classes])  # rows and columns, once each
    assert image.width <= 330


def test_confusion_matrix_writes_counts_only_where_they_fit():
    classes = [f"c{i}" for i in range(25)]  # 20-pixel cells: two digits fit, four do not
    small = np.full((25, 25), 3) + np.eye(25, dtype=int) * 40
    large = small.copy()
    large[0, 0] = 4000
    red = lambda image: ((image[..., 0] > 200) & (image[..., 1] < 100)).sum()  # noqa: E731
    assert red(np.asarray(confusion_matrix_image(small, classes, "valid"))) > 25 * 25 * 5
    assert red(np.asarray(confusion_matrix_image(large, classes, "valid"))) == 0


def test_confusion_matrix_of_a_class_without_samples_and_of_many_classes():
    image = confusion_matrix_image(np.zeros((3, 3), dtype=int), ["a", "b", "c"], "valid")
    assert image.mode == "RGB"
    many = confusion_matrix_image(np.eye(100, dtype=int), [str(i) for i in range(100)], "valid")
    assert many.width >= 100 * 16 and many.height >= 100 * 16


def test_the_sample_models_pictures_fit_a_tensorboard_card_unscaled():
    """TensorBoard shrinks a picture wider than its card (about 330 pixels) by dropping columns, erasing parts of
    thin text: the tutorial's five weight layers and ten classes fit."""
    names = ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    assert gradient_flow_image(names, [1e-3] * 5, [1e-2] * 5, epoch=19).width <= 330
    conf_mat = np.full((10, 10), 3) + np.eye(10, dtype=int) * 300
    assert confusion_matrix_image(conf_mat, [str(i) for i in range(10)], "valid").width <= 330
