"""Backbones: a registry kind; local weight files (never a download), clear errors, freezing for
fine-tuning, and the input preprocessing the weights expect."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from registry import BACKBONES, MODELS
from segtrain.errors import SegtrainError
from tests.models import tiny


@pytest.fixture
def backbone_settings(configure):
    """backbone_settings(*bindings): gin bindings of backbones.<name>.* for the models built next."""
    return lambda *bindings: configure(*bindings, tiny=False)


def _randomise(model: keras.Model) -> None:
    rng = np.random.default_rng(1)
    model.set_weights([rng.normal(size=w.shape).astype(w.dtype) for w in model.get_weights()])


def _assert_same(backbone: keras.Model, reference: keras.Model) -> None:
    by_name = {v.path: v for v in reference.weights}  # 'conv1_conv/kernel'
    compared = 0
    for v in backbone.weights:
        key = v.path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), keras.ops.convert_to_numpy(by_name[key]), err_msg=key)
        compared += 1
    assert compared == len(reference.weights)


@pytest.mark.slow
def test_resnet50_weights_file_loads_into_the_dilated_deeplab_backbone(tmp_path, backbone_settings):
    reference = keras.applications.ResNet50(include_top=False, weights=None)
    _randomise(reference)
    path = str(tmp_path / "resnet50_notop.weights.h5")
    reference.save_weights(path)
    backbone_settings(f"backbones.resnet50.weights = '{path}'")
    model = MODELS.get("deeplabv3")(num_classes=3, output_stride=8)
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("conv5_block3_2_conv").dilation_rate == (4, 4)
    _assert_same(backbone, reference)
    # The weights expect Caffe's preprocessing (BGR, mean subtracted): the model says so.
    assert model.preprocessing == "caffe"


def test_tiny_resnet_weights_load_into_the_dilated_backbone(tmp_path, backbone_settings):
    """The same path as ResNet-50's (same layer names), fast."""
    reference = tiny.resnet_tiny((None, None, 3))
    _randomise(reference)
    path = str(tmp_path / "resnet_tiny.weights.h5")
    reference.save_weights(path)
    backbone_settings(f"backbones.resnet_tiny.weights = '{path}'")
    model = MODELS.get("deeplabv3")(num_classes=3, **tiny.TINY_MODELS["deeplabv3"], output_stride=8)
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("conv5_block1_2_conv").dilation_rate == (4, 4)
    _assert_same(backbone, reference)
    assert model.preprocessing == "caffe"
    backbone_settings()  # random weights expect nothing in particular: the pipeline's default
    assert MODELS.get("deeplabv3")(num_classes=3, **tiny.TINY_MODELS["deeplabv3"]).preprocessing is None


@pytest.mark.slow
def test_vgg16_weights_in_keras_h5_format_load_into_fcn(tmp_path, backbone_settings):
    reference = keras.applications.VGG16(include_top=False, weights=None)
    _randomise(reference)
    path = str(tmp_path / "vgg16_notop.h5")  # the legacy HDF5 layout of Keras' own weight files
    from keras.src.legacy.saving import legacy_h5_format
    import h5py

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, reference)
    backbone_settings(f"backbones.vgg16.weights = '{path}'")
    model = MODELS.get("fcn8s")(num_classes=3, fc_filters=8)
    _assert_same(model.get_layer("backbone"), reference)


def test_missing_weights_file_is_a_clear_error(tmp_path, backbone_settings):
    path = str(tmp_path / "nowhere" / "resnet50.h5")
    backbone_settings(f"backbones.resnet_tiny.weights = '{path}'")
    with pytest.raises(SegtrainError, match=r"backbones.resnet_tiny.weights='.*nowhere/resnet50.h5': no such file. "
                                            r"Give a local resnet_tiny weights file \(include_top=False\), or 'imagenet'"):
        MODELS.get("deeplabv3")(num_classes=2, backbone="resnet_tiny")


def test_weights_of_another_network_are_a_clear_error(tmp_path, backbone_settings):
    path = str(tmp_path / "vgg_tiny.weights.h5")
    tiny.vgg_tiny((None, None, 3)).save_weights(path)
    backbone_settings(f"backbones.resnet_tiny.weights = '{path}'")
    with pytest.raises(SegtrainError) as e:
        MODELS.get("unet_resnet50")(num_classes=2, backbone="resnet_tiny")
    message = str(e.value)
    assert message.startswith(f"backbones.resnet_tiny.weights={path!r}: cannot be loaded into the "
                              f"resnet_tiny backbone (include_top=False): ")
    bad = tmp_path / "weights.bin"
    bad.write_bytes(b"x")
    backbone_settings(f"backbones.resnet_tiny.weights = '{bad}'")
    with pytest.raises(SegtrainError, match=r"expected a Keras weights file ending in .h5"):
        MODELS.get("unet_resnet50")(num_classes=2, backbone="resnet_tiny")


def test_unknown_backbone_names_the_binding_and_the_closest(backbone_settings):
    with pytest.raises(SegtrainError) as e:
        MODELS.get("deeplabv3")(num_classes=2, backbone="resnet5")
    assert str(e.value).startswith("models.deeplabv3.backbone: Unknown backbone 'resnet5'. Did you mean 'resnet50'")
    assert {"resnet50", "resnet101", "vgg16"} <= set(BACKBONES.names())


def test_freeze_backbone_trains_only_the_head(backbone_settings):
    backbone_settings("backbones.resnet_tiny.freeze = True")
    model = MODELS.get("deeplabv3")(num_classes=2, **tiny.TINY_MODELS["deeplabv3"])
    backbone = model.get_layer("backbone")
    assert not backbone.trainable and backbone.trainable_weights == []
    head = {id(v) for v in model.trainable_weights}
    assert head and not head & {id(v) for v in backbone.weights}


def test_freeze_batch_norm_keeps_statistics_while_convolutions_train(backbone_settings):
    backbone_settings("backbones.resnet_tiny.freeze_batch_norm = True")
    model = MODELS.get("unet_resnet50")(num_classes=2, **tiny.TINY_MODELS["unet_resnet50"])
    backbone = model.get_layer("backbone")
    bn = [l for l in backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bn and not any(l.trainable for l in bn)
    assert backbone.get_layer("conv2_block1_2_conv").trainable
    before = [keras.ops.convert_to_numpy(w).copy() for l in bn for w in l.weights]
    model(np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32) * 5, training=True)
    after = [keras.ops.convert_to_numpy(w) for l in bn for w in l.weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    # The decoder's own batch norm still learns its statistics.
    decoder_bn = model.get_layer("decoder.stride8.conv1.bn")
    assert decoder_bn.trainable
