"""The Experiment builds what every command needs, and nothing a command does not need:
evaluation builds no optimizer, reads no training split, and restores the model's weights alone."""

from __future__ import annotations

import json
import warnings

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from registry import DATASETS, MODELS
from segtrain.data.transforms import PREPROCESSING, Normalization
from segtrain.errors import SegtrainError, SegtrainWarning
from segtrain.experiment import Experiment, ExperimentConfig
from tests.conftest import copy_run
from tests.models import tiny

GUARD = {"train_split_forbidden": False, "splits_read": []}


@DATASETS.register("guarded_shapes", override=True)
def guarded_shapes(split: str = "train"):
    """``shapes``, refusing its training split while GUARD says so."""
    GUARD["splits_read"].append(split)
    if split == "train" and GUARD["train_split_forbidden"]:
        raise AssertionError("the training split was read")
    return DATASETS.get("shapes")(split=split)


@pytest.fixture
def guarded_run(trained_run, tmp_path):
    """A copy of the session's trained run, to be evaluated on ``guarded_shapes``; refuses training data."""
    run = copy_run(trained_run, tmp_path / "run")
    GUARD.update(train_split_forbidden=True, splits_read=[])
    yield run
    GUARD["train_split_forbidden"] = False


@pytest.fixture
def no_optimizer(monkeypatch):
    """Building any Keras optimizer fails the test."""

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"an optimizer ({type(self).__name__}) was built")

    monkeypatch.setattr(keras.optimizers.Optimizer, "__init__", refuse)


def test_evaluate_builds_no_optimizer_reads_no_training_split_restores_weights_only(guarded_run, no_optimizer, capsys):
    from segtrain.commands import evaluate

    gin.clear_config()
    # The run's data, through a plugin that fails on the training split. An optimizer other than
    # the run's: restoring it would not fit; the weights alone do.
    assert evaluate.run(guarded_run, [], ["train.dataset = 'guarded_shapes'", "optimizer.name = 'sgd'"],
                        {"split": "test", "checkpoint": "latest"}) == 0
    assert GUARD["splits_read"] and set(GUARD["splits_read"]) == {"test"}
    results = json.loads(open(f"{guarded_run}/eval_results.json").read())
    assert results["split"] == "test" and results["step"] == 6 and 0 <= results["mean_iou"] <= 1
    assert "Evaluating ckpt-6 (step 6)" in capsys.readouterr().out


def test_the_model_is_built_for_the_experiment_split(configure):
    configure("train.dataset = 'guarded_shapes'")
    GUARD["splits_read"] = []
    experiment = Experiment(split="validation")
    assert experiment.model.output_shape[-1] == 4
    assert experiment.eval_dataset().element_spec["image"].shape[-1] == 3
    assert set(GUARD["splits_read"]) == {"validation"}


def test_restoring_weights_of_another_model_is_a_clear_error(trained_run, tmp_path, configure):
    run = copy_run(trained_run, tmp_path / "run")
    configure("models.unet.base_filters = 8")
    with pytest.raises(SegtrainError, match=r"Checkpoint .*ckpt-\d does not fit the model configured now: it was "
                                            r"written by a different model or configuration"):
        Experiment().restore(run)
    configure()
    with pytest.raises(SegtrainError, match="--checkpoint=first: no such checkpoint. Use best, latest, or one of "):
        Experiment().restore(run, "first")
    with pytest.raises(SegtrainError, match="No checkpoint in .*: train first"):
        Experiment().restore(str(tmp_path / "empty"))


def test_restore_picks_best_or_latest(trained_run, configure):
    configure()
    best = json.loads((trained_run / "best" / "best.json").read_text())
    path, step = Experiment().restore(str(trained_run))
    assert step == best["step"] and path.endswith(best["path"])
    path, step = Experiment().restore(str(trained_run), "latest")
    assert step == 6 and path.endswith("ckpt-6")


@pytest.mark.slow  # trains or evaluates a run end to end: the full tier
def test_pipeline_applies_the_preprocessing_the_backbone_weights_expect(tmp_path, configure):
    path = str(tmp_path / "resnet_tiny.weights.h5")
    tiny.resnet_tiny((None, None, 3)).save_weights(path)
    configure(*tiny.bindings("deeplabv3"), f"backbones.resnet_tiny.weights = '{path}'")
    experiment = Experiment()
    caffe = PREPROCESSING["caffe"]
    assert experiment.normalization == caffe and caffe.bgr and caffe.std == (1.0, 1.0, 1.0)
    # What the model sees: BGR, ImageNet mean subtracted, no scaling.
    raw, _ = experiment.read("validation")
    image = next(iter(raw))["image"].numpy().astype(np.float32)
    seen = next(iter(experiment.eval_dataset(batch_size=1)))["image"][0].numpy()
    h, w = image.shape[:2]
    np.testing.assert_allclose(seen[:h, :w], image[..., ::-1] - np.array([103.939, 116.779, 123.68]), atol=1e-4)
    np.testing.assert_array_equal(caffe.invert(seen[:h, :w]), image.astype(np.uint8))  # the panels' inverse

    # Random weights expect nothing in particular: the default normalisation.
    configure(*tiny.bindings("deeplabv3"))
    assert Experiment().normalization == Normalization()


def test_explicit_pipeline_mean_wins_with_a_warning(tmp_path, configure):
    path = str(tmp_path / "resnet_tiny.weights.h5")
    tiny.resnet_tiny((None, None, 3)).save_weights(path)
    configure(*tiny.bindings("deeplabv3"), f"backbones.resnet_tiny.weights = '{path}'",
              "pipeline.mean = (1.0, 2.0, 3.0)")
    with pytest.warns(SegtrainWarning, match="pipeline.mean/std are set, so they replace the 'caffe' preprocessing"):
        normalization = Experiment().normalization
    assert normalization.mean == (1.0, 2.0, 3.0) and not normalization.bgr


def test_facts_of_a_plain_keras_plugin_model(configure):
    @MODELS.register("test_plain_model", override=True)
    def test_plain_model(num_classes):
        inputs = keras.Input((None, None, 3))
        model = keras.Model(inputs, keras.layers.Conv2D(num_classes, 1, dtype="float32")(inputs))
        model.size_divisor = 4  # the attribute contract of plain Keras plugin models
        return model

    configure("train.model = 'test_plain_model'")
    experiment = Experiment()
    assert experiment.facts.size_divisor == 4 and experiment.facts.preprocessing is None
    batch = next(iter(experiment.eval_dataset(batch_size=1)))
    assert batch["image"].shape[1] % 4 == 0 and batch["image"].shape[2] % 4 == 0


def test_an_unknown_plugin_fails_before_any_work(configure):
    configure("train.loss = 'dice_loss'")
    with pytest.raises(ValueError, match="Unknown loss 'dice_loss'. Did you mean 'dice'"):
        Experiment()


def test_experiment_config_is_the_train_gin_scope(configure):
    configure("train.eval_split = 'test'", "train.seed = 3")
    config = ExperimentConfig()
    assert (config.eval_split, config.seed, config.mode) == ("test", 3, "max")
    assert Experiment(config).split == "test"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert Experiment(config).strategy is tf.distribute.get_strategy()


@pytest.mark.parametrize("model", ["deeplabv3_plus", "unet_resnet50"])
def test_synchronized_batch_norm_is_one_setting_reaching_every_batch_norm(configure, tmp_path, model):
    """The backbone's batch norms (inside the nested model) and the decoder's, which the model
    builders never saw a setting for; the saved model keeps it."""
    from segtrain.models import leaf_layers

    configure(*tiny.bindings(model), "train.synchronized_batch_norm = True")
    built = Experiment().model
    norms = [layer for layer in leaf_layers(built) if isinstance(layer, keras.layers.BatchNormalization)]
    backbone = built.get_layer("backbone")
    assert any(layer in backbone.layers for layer in norms) and len(norms) > len(
        [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)])
    assert all(layer.synchronized for layer in norms)
    built.save(tmp_path / "m.keras")
    loaded = keras.models.load_model(tmp_path / "m.keras")
    assert all(layer.synchronized for layer in leaf_layers(loaded) if isinstance(layer, keras.layers.BatchNormalization))
    configure(*tiny.bindings(model))
    assert not any(layer.synchronized for layer in leaf_layers(Experiment().model)
                   if isinstance(layer, keras.layers.BatchNormalization))


def test_a_model_level_synchronized_batch_norm_says_where_the_setting_went(configure):
    with pytest.raises(SegtrainError) as e:
        configure("models.unet.synchronized_batch_norm = True")
    assert "models.unet.synchronized_batch_norm is now train.synchronized_batch_norm" in str(e.value)
