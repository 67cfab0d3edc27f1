"""The model zoo: the structure that defines each architecture, at the sizes users train.

Full-size models are built (cheap); only a few are run, once, on a small batch.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from registry import MODELS
from segtrain.errors import SegtrainError
from segtrain.models.unet import OverlapTilePad, valid_unet_sizes
from tests.models import tiny


def layer(model, name):
    """A layer of the model or of its nested backbone."""
    try:
        return model.get_layer(name)
    except ValueError:
        return model.get_layer("backbone").get_layer(name)


def shape(model, name):
    return tuple(layer(model, name).output.shape[1:])


def conv5_rates(model, stage="conv5"):
    return {
        l.name: l.dilation_rate[0] for l in model.get_layer("backbone").layers
        if l.name.startswith(f"{stage}_block") and l.name.endswith("_2_conv")
    }


@pytest.fixture(scope="module")
def deeplab16():
    return MODELS.get("deeplabv3")(num_classes=21)


@pytest.mark.slow
def test_deeplabv3_output_stride_16_dilates_conv5_and_uses_rates_6_12_18():
    model = MODELS.get("deeplabv3")(num_classes=21, input_shape=(128, 128, 3))
    assert shape(model, "conv4_block6_out") == (8, 8, 1024)  # conv4 keeps its stride: 1/16
    assert shape(model, "conv5_block3_out") == (8, 8, 2048)  # conv5 no longer halves
    assert layer(model, "conv5_block1_1_conv").strides == (1, 1)
    assert layer(model, "conv5_block1_0_conv").strides == (1, 1)
    assert layer(model, "conv4_block1_1_conv").strides == (2, 2)
    assert set(conv5_rates(model).values()) == {2} and set(conv5_rates(model, "conv4").values()) == {1}
    # ASPP: a 1x1 branch, three atrous 3x3 branches, image pooling resized to the feature map.
    assert [layer(model, f"aspp.rate{r}.conv").dilation_rate for r in (6, 12, 18)] == [(6, 6), (12, 12), (18, 18)]
    assert layer(model, "aspp.1x1.conv").kernel_size == (1, 1)
    assert shape(model, "aspp.pool.mean") == (1, 1, 2048)
    assert shape(model, "aspp.pool.resize") == (8, 8, 256)
    assert shape(model, "aspp.concat") == (8, 8, 5 * 256)
    assert shape(model, "aspp.project.relu") == (8, 8, 256)
    assert isinstance(layer(model, "aspp.project.bn"), keras.layers.BatchNormalization)
    assert model.output_shape == (None, 128, 128, 21) and model.output_stride == 16


@pytest.mark.slow
def test_deeplabv3_output_stride_8_with_multi_grid():
    model = MODELS.get("deeplabv3")(num_classes=21, output_stride=8, multi_grid=(1, 2, 4), input_shape=(128, 128, 3))
    assert shape(model, "conv3_block4_out") == (16, 16, 512)
    assert shape(model, "conv5_block3_out") == (16, 16, 2048)
    assert set(conv5_rates(model, "conv4").values()) == {2}
    assert conv5_rates(model) == {"conv5_block1_2_conv": 4, "conv5_block2_2_conv": 8, "conv5_block3_2_conv": 16}
    assert [layer(model, f"aspp.rate{r}.conv").dilation_rate[0] for r in (12, 24, 36)] == [12, 24, 36]


@pytest.mark.slow
@pytest.mark.parametrize("size", [(513, 513), (320, 480)])
def test_deeplabv3_takes_any_input_size(deeplab16, size):
    assert deeplab16(np.zeros((1, *size, 3), np.float32)).shape == (1, *size, 21)


@pytest.mark.slow
def test_deeplabv3_resnet101_and_bad_settings():
    model = MODELS.get("deeplabv3")(num_classes=2, backbone="resnet101")
    assert layer(model, "conv4_block23_out") is not None  # 23 blocks in conv4
    with pytest.raises(SegtrainError, match=r"models.deeplabv3.output_stride=32: use 16 or 8"):
        MODELS.get("deeplabv3")(num_classes=2, output_stride=32)
    with pytest.raises(SegtrainError, match=r"models.deeplabv3.backbone: Unknown backbone 'resnet18'. .*'resnet50'"):
        MODELS.get("deeplabv3")(num_classes=2, backbone="resnet18")


@pytest.mark.slow
def test_deeplabv3_plus_fuses_stride_4_features():
    model = MODELS.get("deeplabv3_plus")(num_classes=21, input_shape=(128, 128, 3))
    assert shape(model, "conv2_block3_out") == (32, 32, 256)
    assert shape(model, "decoder.low_level.relu") == (32, 32, 48)
    assert shape(model, "decoder.upsample") == (32, 32, 256)
    assert shape(model, "decoder.concat") == (32, 32, 256 + 48)
    assert layer(model, "decoder.conv2.conv").kernel_size == (3, 3)
    assert model.output_shape == (None, 128, 128, 21)
    small = MODELS.get("deeplabv3_plus")(num_classes=3, **tiny.TINY_MODELS["deeplabv3_plus"])
    assert small(np.zeros((1, 70, 90, 3), np.float32)).shape == (1, 70, 90, 3)


@pytest.mark.parametrize("variant,fused", [(32, []), (16, ["pool4"]), (8, ["pool4", "pool3"])])
def test_fcn_fusion_points(variant, fused):
    model = MODELS.get(f"fcn{variant}s")(num_classes=21, fc_filters=64, input_shape=(128, 128, 3))
    names = {l.name for l in model.layers}
    assert {n for n in names if n.startswith("fuse_")} == {f"fuse_{p}" for p in fused}
    assert layer(model, "fc6").kernel_size == (7, 7)
    assert shape(model, "score_fr") == (4, 4, 21)  # pool5: 1/32
    for pool in fused:
        stride = {"pool4": 16, "pool3": 8}[pool]
        side = 128 // stride
        assert shape(model, f"score_{pool}") == (side, side, 21)
        assert shape(model, f"fuse_{pool}") == (side, side, 21)
        # The finer scores start at zero: training begins from the coarser net's output.
        assert not np.any(layer(model, f"score_{pool}").get_weights()[0])
    final = model.get_layer("upsample")
    assert final.strides == (variant, variant) and final.compute_dtype == "float32"
    assert model.output_shape == (None, 128, 128, 21) and model.size_divisor == 32


def test_fcn_upsampling_starts_bilinear():
    model = MODELS.get("fcn32s")(num_classes=2, fc_filters=8)
    up = model.get_layer("upsample")
    kernel = up.get_weights()[0]  # [64, 64, out, in]: channel c only feeds channel c
    assert kernel.shape == (64, 64, 2, 2) and not kernel[:, :, 0, 1].any()
    ramp = np.broadcast_to(np.arange(4, dtype=np.float32)[None, None, :, None], (1, 4, 4, 2))
    out = keras.ops.convert_to_numpy(up(np.ascontiguousarray(ramp)))
    inner = out[0, 64, 24:104, 0]  # away from the borders, bilinear upsampling of a ramp is a ramp
    assert np.allclose(np.diff(inner), 1 / 32, atol=1e-5)


@pytest.mark.slow
def test_fcn_vgg16_has_the_paper_size():
    assert MODELS.get("fcn8s")(num_classes=21).count_params() == 134_489_759


@pytest.mark.slow
def test_unet_original_is_the_paper_net_on_a_572_tile():
    assert valid_unet_sizes(388, 4) == (572, 388, 92)
    model = MODELS.get("unet_original")(num_classes=2, input_shape=(388, 388, 3))
    assert shape(model, "overlap_tile") == (572, 572, 3)
    assert shape(model, "encoder.level0.conv2.relu") == (568, 568, 64)
    assert shape(model, "bottleneck.conv2.relu") == (28, 28, 1024)
    assert shape(model, "decoder.level3.upconv") == (56, 56, 512)
    assert shape(model, "decoder.level3.crop") == (56, 56, 512)  # 136x136 skip, centre-cropped
    assert shape(model, "decoder.level0.conv2.relu") == (388, 388, 64)
    assert model.output_shape == (None, 388, 388, 2)
    assert layer(model, "encoder.level0.conv1.conv").padding == "valid"
    assert model.count_params() == 31_031_810  # the paper's 2-class net (with biases)


@pytest.mark.parametrize("size,depth", [(7, 1), (30, 2), (100, 2)])
def test_overlap_tile_mirrors_the_image_even_beyond_its_size(size, depth):
    image = np.random.default_rng(0).normal(size=(1, size, size + 3, 1)).astype(np.float32)
    padded = keras.ops.convert_to_numpy(OverlapTilePad(depth)(image))
    total, _, margin = valid_unet_sizes(size, depth)
    expected = np.pad(image, [(0, 0), (margin, total - size - margin), (0, 0), (0, 0)], mode="reflect")
    total_w = valid_unet_sizes(size + 3, depth)[0]
    expected = np.pad(expected, [(0, 0), (0, 0), (margin, total_w - size - 3 - margin), (0, 0)], mode="reflect")
    np.testing.assert_array_equal(padded, expected)


def test_unet_original_output_covers_any_input():
    model = MODELS.get("unet_original")(num_classes=3, depth=2, base_filters=4)
    for size in [(17, 33), (64, 64)]:
        assert model(np.zeros((1, *size, 3), np.float32)).shape == (1, *size, 3)


@pytest.mark.slow
def test_unet_resnet50_skips_from_conv3_conv2_conv1():
    model = MODELS.get("unet_resnet50")(num_classes=21, input_shape=(128, 128, 3))
    assert shape(model, "conv4_block6_out") == (8, 8, 1024)
    assert shape(model, "decoder.stride8.concat") == (16, 16, 512 + 512)  # conv3_block4_out
    assert shape(model, "decoder.stride4.concat") == (32, 32, 256 + 256)  # conv2_block3_out
    assert shape(model, "decoder.stride2.concat") == (64, 64, 64 + 64)  # conv1_relu
    assert isinstance(model.get_layer("decoder.stride8.upconv"), keras.layers.Conv2DTranspose)
    assert model.get_layer("decoder.stride8.upconv").kernel_size == (2, 2)
    assert model.output_shape == (None, 128, 128, 21)
    # Odd sizes: each 2x upsampling is cropped to the size of its skip.
    small = MODELS.get("unet_resnet50")(**tiny.TINY_MODELS["unet_resnet50"], num_classes=3)
    assert small(np.zeros((1, 65, 97, 3), np.float32)).shape == (1, 65, 97, 3)


def test_unet_compact_matches_the_notes():
    model = MODELS.get("unet_compact")(num_classes=21, input_shape=(256, 256, 3))
    widths = [model.get_layer(f"encoder.level{i}.conv").filters for i in range(6)]
    assert widths == [128, 256, 512, 512, 512, 512]
    assert shape(model, "encoder.level5.leaky_relu") == (4, 4, 512)
    assert [model.get_layer(f"decoder.level{i}.upconv").filters for i in (4, 3, 2, 1, 0)] == [512, 512, 512, 512, 256]
    assert shape(model, "decoder.level0.concat") == (128, 128, 256 + 128)
    assert isinstance(model.get_layer("encoder.level0.leaky_relu"), keras.layers.LeakyReLU)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
    assert model.output_shape == (None, 256, 256, 21) and model.size_divisor == 64


def test_xception_unet_is_residual_separable():
    model = MODELS.get("xception_unet")(num_classes=3, input_shape=(64, 64, 3))
    assert shape(model, "encoder.level3.add") == (4, 4, 512)
    assert isinstance(model.get_layer("encoder.level0.sepconv1"), keras.layers.SeparableConv2D)
    assert model.get_layer("encoder.level0.residual").strides == (2, 2)
    assert isinstance(model.get_layer("encoder.level0.bn1"), keras.layers.BatchNormalization)
    assert shape(model, "decoder.level0.concat") == (64, 64, 32 + 32)
    assert shape(model, "decoder.level3.concat") == (8, 8, 256 + 256)
    assert model.output_shape == (None, 64, 64, 3) and model.size_divisor == 16


@pytest.mark.parametrize("name", sorted(tiny.TINY_MODELS))
def test_every_model_gives_float32_logits_at_input_size_under_mixed_precision(name):
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = MODELS.get(name)(num_classes=4, **tiny.TINY_MODELS[name])
        divisor = getattr(model, "size_divisor", 1)
        side = -(-64 // divisor) * divisor
        logits = model(np.zeros((2, side, side, 3), np.float32))
        assert logits.shape == (2, side, side, 4) and logits.dtype == "float32"
        assert model.layers[-1].compute_dtype == "float32"
        assert any(l.compute_dtype == "float16" for l in model.layers)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_every_registered_model_has_a_tiny_form_for_the_training_tests():
    import registry

    registry.load_all()
    assert set(_built_in(MODELS)) == set(tiny.TINY_MODELS)


def _page_table(marker: str, header: str) -> dict[str, str]:
    """{name: row} of the table after ``<!-- marker -->`` in docs/pages/models.md, whose first two
    lines must be ``header``."""
    import re

    from tests.conftest import REPO

    page = open(f"{REPO}/docs/pages/models.md").read()
    lines = page.split(f"<!-- {marker} -->\n")[1].split("\n<!-- end")[0].splitlines()
    assert "\n".join(lines[:2]) == header
    return {re.match(r"\| `(\w+)`", line).group(1): line for line in lines[2:]}


def _built_in(registry) -> list[str]:
    """The names registered by segtrain itself (not by tests or installed plugins)."""
    return [n for n in registry.names() if registry.original(n).__module__.startswith("segtrain.")]


@pytest.mark.slow
def test_the_docs_model_table_is_the_generated_one():
    """Every column but GFLOPs is recomputed (GFLOPs: one cheap model, the rest take a minute)."""
    import registry
    from segtrain.models import zoo

    registry.load_all()
    rows = _page_table("model table: segtrain list --models --details", zoo.HEADER)
    built_in = _built_in(MODELS)
    assert sorted(rows) == sorted(built_in)
    for name in built_in:
        d = zoo.details(name, flops=name == "xception_unet")
        expected = zoo.row(d)
        if d["gflops"] is None:  # keep the page's GFLOPs cell
            gflops = rows[name].split(" | ")[2]
            expected = zoo.row({**d, "gflops": float(gflops)})
        assert rows[name] == expected


@pytest.mark.slow
def test_the_docs_backbone_table_is_the_generated_one():
    """Every backbone's cheap columns (preprocessing, ImageNet weights, source); all columns of the
    small ones (building all 25 at 512x512 takes minutes)."""
    from registry import BACKBONES
    from segtrain.models import pretrained, zoo

    rows = _page_table("backbone table: segtrain list --backbones --details", zoo.BACKBONE_HEADER)
    built_in = _built_in(BACKBONES)
    assert sorted(rows) == sorted(built_in)
    for name in built_in:
        backbone = BACKBONES.get(name)()
        cells = rows[name].split(" | ")
        assert cells[4:] == [backbone.preprocessing or "", "yes" if name in pretrained.IMAGENET else "",
                             f"{backbone.source} |"], name
    for name in ("mobilenetv3_small", "efficientnetv2_b0", "mit_b0"):
        measured = zoo.backbone_details(name, flops=name == "mobilenetv3_small")
        if measured["gflops"] is None:  # keep the page's GFLOPs cell
            measured["gflops"] = float(rows[name].split(" | ")[2])
        assert rows[name] == zoo.backbone_row(measured)


def test_every_model_has_a_gin_file_that_selects_it():
    import glob
    import os

    from segtrain.commands.configure import parse_config
    from tests.conftest import REPO

    files = {os.path.basename(p)[:-4]: p for p in glob.glob(f"{REPO}/gin/models/*.gin")}
    assert set(tiny.TINY_MODELS) <= set(files)
    for name in ["fcn8s", "deeplabv3", "unet_original"]:
        import gin

        gin.clear_config()
        parse_config([files[name]], [])
        assert gin.query_parameter("train.model") == name
