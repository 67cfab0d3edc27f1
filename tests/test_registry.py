"""The registry: names, errors, gin wiring, entry-point plugins."""

from __future__ import annotations

import os
import textwrap

import gin
import pytest

import registry
from registry import MODELS, Registry, RegistryError, snake_case
from tests.conftest import segtrain_cli


def test_snake_case_default_names():
    assert snake_case("DeepLabV3Plus") == "deep_lab_v3_plus"
    assert snake_case("unet") == "unet"
    reg = Registry("widgets")

    @reg.register
    def MyFancyNet(num_classes):
        return num_classes

    assert reg.names() == ["my_fancy_net"]
    assert reg.get("my_fancy_net")(3) == 3


def test_duplicates_rejected_unless_override():
    reg = Registry("gadgets")

    @reg.register("thing")
    def first():
        return 1

    with pytest.raises(RegistryError, match="'thing' is already registered"):
        reg.register("thing")(lambda: 2)

    @reg.register("thing", override=True)
    def second():
        return 2

    assert reg.get("thing")() == 2


def test_unknown_name_lists_known_and_closest():
    with pytest.raises(RegistryError) as e:
        MODELS.get("unte")
    message = str(e.value)
    assert "Unknown model 'unte'" in message
    assert "Did you mean 'unet'" in message
    assert "'encoder_decoder'" in message and "'unet'" in message


def test_builtins_registered():
    assert {"unet", "encoder_decoder"} <= set(registry.MODELS.names())
    assert {"cross_entropy", "weighted_cross_entropy", "dice", "focal", "lovasz_softmax", "combined"} <= set(registry.LOSSES.names())
    assert {"pixel_accuracy", "mean_accuracy", "mean_iou", "per_class_iou", "dice"} <= set(registry.METRICS.names())
    assert "shapes" in registry.DATASETS.names()


def test_registering_makes_plugin_gin_configurable_in_kind_module():
    reg = Registry("gizmos")

    @reg.register("knob")
    def knob(num_classes, width=1):
        return num_classes * width

    gin.parse_config("gizmos.knob.width = 7")
    assert reg.get("knob")(2) == 14
    # The decorated function itself stays a plain function.
    assert knob(2) == 2


def test_gin_binding_reaches_a_builtin_model(configure):
    configure("models.unet.base_filters = 3", "models.unet.depth = 1", tiny=False)
    model = MODELS.get("unet")(num_classes=2)
    assert model.get_layer("encoder.level0.conv1.conv").filters == 3


def _write_plugin(root: str) -> None:
    """A throwaway installed package: a module and its dist-info with a segtrain.plugins entry point."""
    pkg = os.path.join(root, "tinyplug")
    os.makedirs(pkg)
    with open(os.path.join(pkg, "__init__.py"), "w") as f:
        f.write(textwrap.dedent('''
            import keras
            from registry import MODELS

            @MODELS.register
            def TinyPlugNet(num_classes, width=4):
                """A one-conv model from a third-party package."""
                inputs = keras.Input((None, None, 3))
                x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(inputs)
                outputs = keras.layers.Conv2D(num_classes, 1, dtype="float32")(x)
                return keras.Model(inputs, outputs)
        '''))
    dist = os.path.join(root, "tinyplug-0.1.dist-info")
    os.makedirs(dist)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: tinyplug\nVersion: 0.1\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write("[segtrain.plugins]\ntinyplug = tinyplug\n")
    with open(os.path.join(dist, "RECORD"), "w") as f:
        f.write("")


@pytest.mark.slow
def test_an_entry_point_plugin_is_found_by_a_fresh_process(tmp_path):
    """A package's segtrain.plugins entry point registers its model (its name derived from the
    class-style function name) in a fresh `segtrain` process. Training entry-point plugins by
    name in fresh processes: tests/test_example_plugin.py."""
    site = tmp_path / "site"
    _write_plugin(str(site))
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    result = segtrain_cli("list", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tiny_plug_net(num_classes, width=4)" in result.stdout
