"""Grad-CAM and activation grids (segtrain.explain) and the `segtrain explain` command."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from PIL import Image

from registry import MODELS
from segtrain import explain
from segtrain.errors import SegtrainError
from segtrain.models import facts
from tests.conftest import assert_user_error, copy_run, read_tags, segtrain_main
from tests.models import tiny


def linear_model(features: int = 4, classes: int = 3, seed: int = 0) -> keras.Model:
    """image -> 1x1 conv 'features' (A) -> 1x1 conv 'logits': d logits / d A is the second kernel."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((None, None, 3))
    a = keras.layers.Conv2D(features, 1, name="features")(inputs)
    return keras.Model(inputs, keras.layers.Conv2D(classes, 1, name="logits")(a))


def numpy_grad_cam(model, image, class_id, mask):
    """Grad-CAM worked out by hand for ``linear_model``: (weights, map before normalising)."""
    w1, b1 = model.get_layer("features").get_weights()
    w2, _ = model.get_layer("logits").get_weights()
    a = image @ w1[0, 0] + b1  # [H,W,K]
    # target = sum over the mask of logits[..., c]; d target / d A[i,j,k] = w2[k,c] * mask[i,j]
    weights = w2[0, 0, :, class_id] * mask.sum() / mask.size
    return weights, np.maximum(a @ weights, 0.0)


def test_grad_cam_matches_numpy_on_a_model_with_a_known_gradient():
    model = linear_model()
    image = np.random.default_rng(1).normal(size=(10, 12, 3)).astype(np.float32)
    logits = keras.ops.convert_to_numpy(model(image[None]))[0]
    cam = explain.GradCam(model, "features")
    for class_id in range(3):
        mask = (logits.argmax(-1) == class_id).astype(np.float32)
        weights, raw = numpy_grad_cam(model, image, class_id, mask)
        result = cam(image, class_id)
        assert result.region_pixels == mask.sum()
        np.testing.assert_allclose(result.target, (logits[..., class_id] * mask).sum(), rtol=1e-5)
        np.testing.assert_allclose(result.weights, weights, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(result.raw, raw, rtol=1e-4, atol=1e-6)
        if raw.max() > 0:  # the layer is at the image's size: the resize changes nothing
            np.testing.assert_allclose(result.cam, raw / raw.max(), rtol=1e-4, atol=1e-6)


def test_a_box_region_sums_the_logits_of_its_pixels_only():
    model = linear_model()
    image = np.random.default_rng(2).normal(size=(10, 12, 3)).astype(np.float32)
    mask = np.zeros((10, 12), np.float32)
    mask[2:5, 3:9] = 1  # --box=2,3,5,9: the last row and column are excluded
    weights, raw = numpy_grad_cam(model, image, 1, mask)
    result = explain.GradCam(model, "features")(image, 1, box=(2, 3, 5, 9))
    assert result.region_pixels == 18
    np.testing.assert_allclose(result.weights, weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(result.raw, raw, rtol=1e-4, atol=1e-6)


def test_an_empty_region_gives_an_all_zero_map_not_nan():
    model = linear_model()
    model.get_layer("logits").set_weights([np.zeros((1, 1, 4, 3), np.float32), np.array([0.0, 0.0, -9.0], np.float32)])
    image = np.random.default_rng(3).normal(size=(16, 16, 3)).astype(np.float32)
    cam = explain.GradCam(model, "features")
    for result in (cam(image, 2), cam(image, 1, box=(20, 20, 30, 30))):  # predicted nowhere; box off the image
        assert result.region_pixels == 0 and result.target == 0.0
        assert result.cam.shape == (16, 16) and np.isfinite(result.cam).all() and not result.cam.any()


@pytest.mark.parametrize("name", sorted(tiny.TINY_MODELS))
def test_every_model_explains_a_box_at_its_deepest_encoder_stage(name):
    keras.utils.set_random_seed(0)
    model = MODELS.get(name)(num_classes=3, **tiny.TINY_MODELS[name])
    assert facts(model).cam_layer, f"{name} names no cam_layer"
    cam = explain.GradCam(model)
    assert cam.layer.partition(":")[0] == facts(model).cam_layer.partition(":")[0]
    image = np.random.default_rng(0).normal(size=(64, 64, 3)).astype(np.float32)
    maps = [cam(image, c, box=(8, 8, 56, 56)) for c in range(3)]
    for result in maps:
        assert result.cam.shape == (64, 64) and result.cam.dtype == np.float32
        assert np.isfinite(result.cam).all() and np.isfinite(result.weights).all()
        assert result.cam.min() >= 0 and result.cam.max() <= 1
        assert result.region_pixels == 48 * 48 and result.target != 0
    assert any(result.cam.max() == pytest.approx(1.0) for result in maps)
    # The default layer's map is the model's coarsest one (global pooling aside).
    shapes = explain.layer_shapes(model, (1, 64, 64, 3))
    assert shapes[cam.layer][1:3] == maps[0].raw.shape
    coarsest = min(s[1] * s[2] for s in shapes.values() if len(s) == 4 and s[1] * s[2] > 1)
    assert maps[0].raw.size == coarsest


def test_a_model_without_the_fact_falls_back_to_its_smallest_feature_map():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="relu", name="down1")(inputs)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu", name="down2")(x)
    pooled = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)  # 1x1: left out
    x = keras.layers.Multiply(name="gate")([x, pooled])  # the last of the smallest maps
    x = keras.layers.UpSampling2D(4, name="up")(x)
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="logits")(x))
    assert explain.choose_layer(model) == "gate"
    result = explain.GradCam(model)(np.ones((16, 16, 3), np.float32), 0, box=(0, 0, 16, 16))
    assert result.raw.shape == (4, 4) and result.cam.shape == (16, 16) and np.isfinite(result.cam).all()
    sequential = keras.Sequential([keras.Input((None, None, 3)),
                                   keras.layers.Conv2D(4, 3, strides=2, padding="same", name="down"),
                                   keras.layers.UpSampling2D(2), keras.layers.Conv2D(2, 1, name="logits")])
    result = explain.GradCam(sequential, "down")(np.ones((8, 8, 3), np.float32), 0, box=(0, 0, 8, 8))
    assert result.raw.shape == (4, 4) and result.cam.shape == (8, 8) and np.isfinite(result.cam).all()


def test_a_layer_that_does_not_lead_to_the_logits_is_refused():
    inputs = keras.Input((None, None, 3))
    a = keras.layers.Conv2D(4, 1, name="a")(inputs)
    side = keras.layers.Conv2D(4, 1, name="side")(a)  # a second output, not the logits
    model = keras.Model(inputs, [keras.layers.Conv2D(2, 1, name="logits")(a), side])
    with pytest.raises(SegtrainError, match="--layer=side: the layer does not lead to the model's logits"):
        explain.GradCam(model, "side")(np.ones((4, 4, 3), np.float32), 0)


def test_layers_are_chosen_by_name_and_output_index():
    model = MODELS.get("deeplabv3_plus")(num_classes=3, **tiny.TINY_MODELS["deeplabv3_plus"])
    assert explain.choose_layer(model) == "backbone:1"  # its cam_layer: the last stage, before ASPP
    assert explain.choose_layer(model, "backbone") == "backbone:1"  # a name alone: the last output
    assert explain.choose_layer(model, "backbone:0") == "backbone:0"
    assert explain.choose_layer(model, "aspp.project.relu") == "aspp.project.relu"
    with pytest.raises(SegtrainError, match=r"--layer=aspp\.projct: .*no such layer\. Did you mean 'aspp\.project"):
        explain.choose_layer(model, "aspp.projct")


def test_a_plain_subclassed_model_is_refused_with_a_message():
    class Net(keras.Model):
        def __init__(self):
            super().__init__(name="net")
            self.conv = keras.layers.Conv2D(2, 1)

        def call(self, x):
            return self.conv(x)

    net = Net()
    net(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(SegtrainError, match="not a functional Keras model"):
        explain.GradCam(net)


def test_classes_by_name_case_or_index_and_a_listing_error():
    names = ("background", "circle", "rectangle", "triangle")
    assert [explain.class_index(v, names) for v in ("circle", "Rectangle", "3", 0)] == [1, 2, 3, 0]
    with pytest.raises(SegtrainError, match=r"--class=rect: .*Did you mean 'rectangle'\?.*0=background, 1=circle"):
        explain.class_index("rect", names)
    with pytest.raises(SegtrainError, match="--class=4"):
        explain.class_index("4", names)


def test_box_parsing():
    assert explain.parse_box(["0", "2", "10", "12"]) == (0, 2, 10, 12)
    assert explain.parse_box(None) is None
    for bad in (["1", "2", "3"], ["5", "0", "5", "9"], ["a", "0", "1", "1"], ["-1", "0", "4", "4"]):
        with pytest.raises(SegtrainError, match="--box=.*Y0,X0,Y1,X1"):
            explain.parse_box(bad)


def test_colour_ramp_runs_from_blue_to_red():
    low, mid, high = explain.colour_ramp(np.array([0.0, 0.5, 1.0]))
    assert low.argmax() == 2 and high.argmax() == 0 and mid[1] == 255
    assert explain.overlay(np.zeros((3, 4, 3), np.uint8), np.ones((3, 4))).shape == (3, 4, 3)


def test_activation_grid_tiles_min_max_normalised_channels():
    a = np.random.default_rng(0).normal(size=(4, 5, 10)).astype(np.float32)
    a[..., 3] = 7.0  # a constant channel shows as 0
    grid = explain.activation_grid(a, min_tile=8)
    assert grid.shape == (3 * 9 - 1, 4 * 11 - 1, 3)  # 10 channels: 4 columns, 3 rows; tiles 8x10 + 1 px
    assert (grid[8] == 255).all() and (grid[:, 10] == 255).all()  # the separators
    np.testing.assert_array_equal(grid[0:8, 3 * 11: 3 * 11 + 10], np.broadcast_to(explain.colour_ramp(0.0), (8, 10, 3)))
    tile = grid[0:8:2, 0:10:2]  # channel 0, back at its own size: its minimum and maximum are the ramp's ends
    assert (tile == explain.colour_ramp(0.0)).all(-1).sum() == 1 and (tile == explain.colour_ramp(1.0)).all(-1).sum() == 1
    many = explain.activation_grid(np.ones((2, 2, 100), np.float32), min_tile=2)
    assert many.shape == (8 * 3 - 1, 8 * 3 - 1, 3)  # at most 64 channels


# The command, on the session's tiny U-Net run of `shapes` (classes: background, circle, rectangle, triangle).

@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    square = np.full((48, 56, 3), 200, np.uint8)
    square[10:30, 12:34] = (60, 60, 220)
    Image.fromarray(square).save(folder / "square.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / "noise.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_cli_writes_heat_maps_arrays_grids_and_summaries(trained_run, images, tmp_path):
    out = tmp_path / "out"
    result = segtrain_main("explain", f"--model_dir={trained_run}", f"--input={images}", "--class=circle",
                           "--activations", f"--output={out}")
    assert result.returncode == 0, result.stderr
    assert "broken.png" in result.stderr and "skipped" in result.stderr
    layer = "bottleneck.conv2.relu"
    for stem, size in (("square", (48, 56)), ("noise", (40, 40))):
        assert Image.open(out / f"{stem}_circle_gradcam.png").size == size[::-1]
        cam = np.load(out / f"{stem}_circle_gradcam.npy")
        assert cam.shape == size and np.isfinite(cam).all() and 0 <= cam.min() and cam.max() <= 1
        assert (out / f"{stem}_{layer}_activations.png").is_file()
        assert f"{stem}.png" in result.stdout
    assert not list(out.glob("broken*"))
    assert {"square/gradcam_circle", f"noise/activations_{layer}"} <= read_tags(str(out / "tensorboard"))


def test_cli_box_off_the_image_says_the_map_is_empty_and_writes_to_the_run(trained_run, images, tmp_path):
    run = copy_run(trained_run, tmp_path / "run")
    result = segtrain_main("explain", f"--model_dir={run}", f"--input={images}/square.png", "--class=2",
                           "--box=100,100,120,120", "--layer=encoder.level1.pool")
    assert result.returncode == 0, result.stderr
    assert "the box lies outside the image, so the map is all zeros" in result.stdout
    assert not np.load(os.path.join(run, "explain", "square_rectangle_gradcam.npy")).any()


def test_cli_lists_layers_and_refuses_unknown_classes_and_layers(trained_run, images):
    listed = segtrain_main("explain", f"--model_dir={trained_run}", "--layer=list")
    assert listed.returncode == 0, listed.stderr
    assert "* bottleneck.conv2.relu" in listed.stdout and "encoder.level0.pool" in listed.stdout
    given = [f"--model_dir={trained_run}", f"--input={images}/square.png"]
    assert_user_error(segtrain_main("explain", *given, "--class=square"), "--class=square",
                      "0=background, 1=circle, 2=rectangle, 3=triangle")
    assert_user_error(segtrain_main("explain", *given, "--class=circle", "--layer=botleneck"),
                      "--layer=botleneck", "Did you mean", "bottleneck.")
