"""The modern backbones (ConvNeXt, EfficientNetV2, MobileNetV3, ResNet v2, the Mix Transformer):
every model that takes a backbone takes each of them, at any output stride, through .keras,
export and Grad-CAM.

The contract runs on a small member of each family (tests/models/tiny.py: keras.applications'
own code at a few channels, so the same layers, names and strides); every registered full-size
backbone is built once at output stride 16 (slow tier).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from registry import BACKBONES, MODELS
from segtrain import explain
from segtrain import export as export_lib
from segtrain.errors import SegtrainError
from segtrain.models import facts
from segtrain.models.zoo import measured_output_stride
from tests.models import tiny

FAMILIES = sorted(tiny.FAMILIES) + ["mit_mini"]  # and SegFormer's Mix Transformer
SMALL = {"aspp_filters": 16, "low_level_filters": 16, "decoder_filters": 16}
MODEL_SETTINGS = {
    "deeplabv3": {"aspp_filters": 16, "output_stride": 8, "multi_grid": (1, 2, 4)},
    "deeplabv3_plus": SMALL,
    "fcn8s": {"fc_filters": 16},
    "unet_encoder": {"decoder_filters": (16, 16, 16, 16)},
    "segformer": {"decoder_dim": 16},
}

# The registered keras.applications networks, with the strides of their stages. Each family's
# other members (convnext_small/base, efficientnetv2_b1-b3 and s, mobilenetv3_small,
# resnet101_v2) are the same code at other depths and widths: one full-size build per family.
FULL_SIZE = {
    "convnext_tiny": [4, 8, 16, 32],
    "efficientnetv2_b0": [2, 4, 8, 16, 32],
    "mobilenetv3_large": [2, 4, 8, 16, 32],
    "resnet50_v2": [2, 4, 8, 16, 32],
}


def images(side: int = 64, batch: int = 2) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(batch, side, side, 3)).astype(np.float32)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", FAMILIES)
@pytest.mark.parametrize("model_name", sorted(MODEL_SETTINGS))
def test_every_backbone_model_takes_every_family(backbone, model_name):
    model = MODELS.get(model_name)(num_classes=3, backbone=backbone, **MODEL_SETTINGS[model_name],
                                   input_shape=(64, 64, 3))
    assert model(images()).shape == (2, 64, 64, 3)
    declared = facts(model).output_stride
    assert declared == {"deeplabv3": 8, "deeplabv3_plus": 16, "fcn8s": 32, "unet_encoder": 16, "segformer": 32}[model_name]
    assert measured_output_stride(model, 64) == declared


@pytest.mark.slow
@pytest.mark.parametrize("backbone", FAMILIES)
def test_odd_input_sizes_give_logits_at_the_input_size(backbone):
    """MobileNetV3's explicit padding rounds odd sizes down where 'same' padding rounds up: the
    U-Net's skips and DeepLab's decoder meet maps of either size."""
    for name in ("unet_encoder", "deeplabv3_plus"):
        settings = {k: v for k, v in MODEL_SETTINGS[name].items()}
        model = MODELS.get(name)(num_classes=3, backbone=backbone, **settings)
        for size in ((65, 97), (71, 33)):
            assert model(np.zeros((1, *size, 3), np.float32)).shape == (1, *size, 3), (name, size)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", FAMILIES)
def test_deeplabv3_plus_on_each_family_saves_exports_and_explains(backbone, tmp_path):
    keras.utils.set_random_seed(0)
    model = MODELS.get("deeplabv3_plus")(num_classes=3, backbone=backbone, **SMALL)
    x = images(48)
    logits = keras.ops.convert_to_numpy(model(x))
    # .keras round trip: same logits, same facts.
    model.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), logits, rtol=1e-5, atol=1e-5)
    assert facts(loaded) == facts(model)
    # SavedModel export: the serving signature gives the model's logits for uint8 pixels.
    pixels = np.random.default_rng(1).integers(0, 256, size=(1, 48, 48, 3), dtype=np.uint8)
    export_lib.export_model(str(tmp_path / "export"), model, model, lambda v: v / 255.0, 3)
    served = tf.saved_model.load(str(tmp_path / "export")).signatures["serving_default"](images=tf.constant(pixels))
    expected = keras.ops.convert_to_numpy(model(pixels.astype(np.float32) / 255.0))
    np.testing.assert_allclose(served["logits"].numpy(), expected, rtol=1e-4, atol=1e-4)
    # Grad-CAM at the backbone's deepest stage (its stride-16 map: the backbone is dilated).
    cam = explain.GradCam(model)
    assert cam.layer == facts(model).cam_layer == "backbone:1"
    result = cam(images(64, 1)[0], 1, box=(8, 8, 56, 56))
    assert result.cam.shape == (64, 64) and np.isfinite(result.cam).all() and result.raw.shape == (4, 4)


@pytest.mark.parametrize("backbone", FAMILIES)
def test_pretrained_preprocessing_travels_with_the_weights(backbone, tmp_path, configure):
    network = BACKBONES.get(backbone)().build((None, None, 3))
    path = str(tmp_path / "w.weights.h5")
    network.save_weights(path)
    configure(f"backbones.{backbone}.weights = '{path}'", tiny=False)
    model = MODELS.get("fcn8s")(num_classes=2, backbone=backbone, fc_filters=8)
    assert model.preprocessing == (tiny.FAMILIES[backbone][1] if backbone in tiny.FAMILIES else "torch")
    np.testing.assert_array_equal(model.get_layer("backbone").get_weights()[0], network.get_weights()[0])


def test_batch_norm_momentum_sets_every_batch_norm_of_the_backbone(configure):
    from segtrain.models import leaf_layers

    configure("backbones.mobilenetv3_small.batch_norm_momentum = 0.9", tiny=False)
    model = MODELS.get("deeplabv3_plus")(num_classes=2, backbone="mobilenetv3_small", **SMALL)
    norms = [layer for layer in leaf_layers(model.get_layer("backbone"))
             if isinstance(layer, keras.layers.BatchNormalization)]
    assert norms and {layer.momentum for layer in norms} == {0.9}  # keras.applications' own: 0.999
    assert model.get_layer("decoder.conv1.bn").momentum == 0.99  # the head keeps its own
    configure("backbones.mobilenetv3_small.batch_norm_momentum = 1.5", tiny=False)
    with pytest.raises(SegtrainError, match=r"backbones.mobilenetv3_small.batch_norm_momentum=1.5: give a number in \[0, 1\)"):
        MODELS.get("fcn8s")(num_classes=2, backbone="mobilenetv3_small", fc_filters=8)


def test_a_stride_the_backbone_lacks_is_a_clear_error():
    with pytest.raises(SegtrainError, match=r"Backbone 'convnext_mini' has no stage at stride 2; it has \[4, 8, 16, 32\]"):
        BACKBONES.get("convnext_mini")().network((2, 32))
    with pytest.raises(SegtrainError, match=r"Output stride 2: backbone mobilenetv3_mini supports \[4, 8, 16, 32\]"):
        BACKBONES.get("mobilenetv3_mini")().network((32,), output_stride=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_each_kind_of_full_size_backbone_has_its_stages_and_dilates_to_output_stride_16(name):
    backbone = BACKBONES.get(name)()
    strides = FULL_SIZE[name]
    network = backbone.network(strides, input_shape=(64, 64, 3), output_stride=16)
    assert [o.shape[1] for o in network.outputs] == [64 // min(s, 16) for s in strides]
    assert backbone.preprocessing in ("tf", "torch") and "keras.applications" in backbone.source


def test_segtrain_list_shows_the_backbones_with_their_sources():
    from segtrain.commands.listing import text

    listing = text(backbones_only=True)
    assert listing.startswith("backbones:\n") and "models:" not in listing
    for name, source in (("convnext_tiny", "Liu et al. 2022, keras.applications.ConvNeXtTiny"),
                         ("efficientnetv2_s", "Tan & Le 2021, keras.applications.EfficientNetV2S"),
                         ("mobilenetv3_large", "Howard et al. 2019, keras.applications.MobileNetV3Large"),
                         ("resnet101_v2", "keras.applications.ResNet101V2"), ("mit_b3", "Xie et al. 2021 (SegFormer)")):
        entry = listing.split(f"\n  {name}(")[1].split("\n  ")[1]
        assert source in entry, (name, entry)


def test_every_family_member_is_registered_with_imagenet_weights():
    from segtrain.models import pretrained

    names = {f"convnext_{s}" for s in ("tiny", "small", "base")} | {f"efficientnetv2_{s}" for s in ("b0", "b1", "b2", "b3", "s")} \
        | {"mobilenetv3_small", "mobilenetv3_large", "resnet50_v2", "resnet101_v2"}
    assert names <= set(BACKBONES.names()) and names <= set(pretrained.IMAGENET)
