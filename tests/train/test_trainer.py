"""The training loop: learning, TensorBoard output, checkpoints, resume, best, early stop, NaN."""

from __future__ import annotations

import json
import pathlib
import os
import types

import numpy as np
import pytest
import tensorflow as tf

import keras

from registry import DATASETS, LOSSES, MODELS
from segtrain.data.info import DatasetInfo
from segtrain.errors import SegtrainError
from segtrain.experiment import Experiment, ExperimentConfig
from segtrain.train.trainer import Trainer, train
from tests.conftest import copy_run, read_scalars, read_tags


def _trainer(model_dir) -> Trainer:
    """A Trainer of the gin-configured experiment (what train() builds, without fitting)."""
    config = ExperimentConfig()
    return Trainer(Experiment(config, split=config.train_split), str(model_dir))


def test_run_writes_checkpoints_summaries_and_config(trained_run):
    tmp_path = trained_run
    results = json.loads((tmp_path / "eval_results_validation.json").read_text())
    assert results["step"] == 6 and {"loss", "pixel_accuracy", "mean_accuracy", "mean_iou", "per_class_iou", "dice"} <= set(results)
    names = set(os.listdir(tmp_path))
    assert {"checkpoint", "ckpt-3.index", "ckpt-6.index", "operative_config.gin", "train", "eval", "best"} <= names
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best["metric"] == "mean_iou" and best["step"] in (3, 6)
    operative = (tmp_path / "operative_config.gin").read_text()
    assert "train.model = 'unet'" in operative and "unet.base_filters = 4" in operative
    assert "pipeline.crop_size = (32, 32)" in operative

    train_tags = read_tags(str(tmp_path / "train"))
    assert {"loss", "learning_rate", "images_per_second", "mean_iou", "config/operative_gin"} <= train_tags
    eval_tags = read_tags(str(tmp_path / "eval"))
    assert {"loss", "pixel_accuracy", "mean_accuracy", "mean_iou", "dice"} <= eval_tags
    assert "per_class_iou/background" in eval_tags
    assert {"confusion_matrix/0", "examples/0", "examples/1"} <= eval_tags
    eval_steps = [s for s, _ in read_scalars(str(tmp_path / "eval"))["mean_iou"]]
    assert eval_steps == [3, 6]


@pytest.mark.slow
def test_loss_falls(tmp_path, configure):
    configure("train.num_steps = 60", "train.eval_every = 60", "train.steps_per_loop = 10",
              "learning_rate.base = 0.01", "models.unet.base_filters = 8", "train.num_image_panels = 0")
    train(str(tmp_path))
    losses = [v for _, v in read_scalars(str(tmp_path / "train"))["loss"]]
    assert len(losses) == 6
    assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2])


@pytest.fixture(scope="module")
def resumed_run(trained_run, tmp_path_factory):
    """A copy of ``trained_run`` (best checkpoint by mean_iou) trained on to step 9 with the best
    checkpoint chosen by loss; its console output and the trainer's counters after fit()."""
    import contextlib
    import io

    import gin

    from segtrain.commands.configure import parse_config
    from tests.conftest import TINY

    path = pathlib.Path(copy_run(trained_run, tmp_path_factory.mktemp("resumed") / "run"))
    gin.clear_config()
    parse_config([], TINY + ["train.num_steps = 9", "train.best_metric = 'loss'"])
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            trainer = _trainer(path)
            trainer.fit()
    finally:
        gin.clear_config()
    return types.SimpleNamespace(path=path, output=out.getvalue(), step=int(trainer.step.numpy()),
                                 iterations=int(trainer.optimizer.iterations.numpy()))


def test_rerun_resumes_at_the_saved_step(resumed_run, capsys, configure):
    assert "from ckpt-6 at step 6" in resumed_run.output
    assert resumed_run.step == 9
    assert resumed_run.iterations == 9  # optimizer state came back too
    steps = [s for s, _ in read_scalars(str(resumed_run.path / "train"))["loss"]]
    assert steps == [3, 6, 9]
    # A run that is already done does not train again.
    configure("train.num_steps = 9", "train.best_metric = 'loss'")
    again = train(str(resumed_run.path))
    assert "nothing to train" in capsys.readouterr().out
    assert again["step"] == 9 and "mean_iou" in again  # the last evaluation's results


@pytest.mark.slow
def test_early_stopping_and_best_checkpoint(tmp_path, capsys, configure):
    configure("train.num_steps = 30", "train.early_stopping_patience = 1", "train.min_delta = 2.0",
              "train.best_metric = 'loss'")
    train(str(tmp_path))
    assert "Early stopping at step 6" in capsys.readouterr().out
    best = json.loads((tmp_path / "best" / "best.json").read_text())
    assert best == {"metric": "loss", "mode": "min", "value": best["value"], "step": 3, "path": "ckpt-3",
                    "evaluations_without_improvement": 1}
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-6")
    # A restarted job (a requeue) does not train past its early stop...
    train(str(tmp_path))
    assert "stopped early at step 6" in capsys.readouterr().out
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-6")
    # ...unless early stopping is turned off.
    configure("train.num_steps = 9", "train.best_metric = 'loss'")
    train(str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-9")


@pytest.mark.slow
def test_a_different_best_metric_starts_a_new_record(resumed_run):
    assert "chosen by mean_iou (max); now by loss (min): starting a new record" in resumed_run.output
    best = json.loads((resumed_run.path / "best" / "best.json").read_text())
    assert best["metric"] == "loss" and best["mode"] == "min" and best["step"] == 9


def test_restoring_a_checkpoint_of_another_model_is_a_clear_error(trained_run, tmp_path, configure):
    tmp_path = copy_run(trained_run, tmp_path / "run")
    configure("models.unet.base_filters = 8", "train.num_steps = 9")
    with pytest.raises(SegtrainError, match="does not fit the model and optimizer configured now"):
        train(str(tmp_path))


def test_non_finite_weights_are_never_saved(trained_run, tmp_path, configure):
    tmp_path = copy_run(trained_run, tmp_path / "run")
    configure("train.num_steps = 9")
    trainer = _trainer(tmp_path)
    trainer.checkpoints.restore_latest()
    trainer.model.trainable_variables[0].assign(trainer.model.trainable_variables[0] * np.inf)
    with pytest.raises(SegtrainError, match="weights became NaN or infinite by step 9. The last good checkpoint, ckpt-6, is intact"):
        trainer.checkpoints.save(9)
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-6")


@pytest.mark.slow
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(trained_run, tmp_path, configure):
    tmp_path = pathlib.Path(copy_run(trained_run, tmp_path / "run"))
    before = {f: os.path.getmtime(tmp_path / f) for f in os.listdir(tmp_path) if f.startswith("ckpt-6")}

    @LOSSES.register("test_nan", override=True)
    def test_nan(ignore_label=255):
        return lambda labels, logits: tf.reduce_mean(logits, axis=[1, 2, 3]) * np.nan

    configure("train.num_steps = 12", "train.loss = 'test_nan'")
    with pytest.raises(SegtrainError, match=r"loss became nan at step 7\. The last good checkpoint, ckpt-6, is intact"):
        train(str(tmp_path))
    assert tf.train.latest_checkpoint(str(tmp_path)).endswith("ckpt-6")
    assert before == {f: os.path.getmtime(tmp_path / f) for f in before}
    reader = tf.train.load_checkpoint(str(tmp_path / "ckpt-6"))
    assert reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE") == 6


@pytest.mark.slow
def test_gradient_clipping_bounds_the_update(tmp_path, configure):
    configure("train.num_steps = 1", "train.steps_per_loop = 1", "train.eval_every = 1",
              "train.clip_norm = 1e-3", "optimizer.name = 'sgd'", "optimizers.sgd.momentum = 0.0",
              "learning_rate.base = 1.0", "train.num_image_panels = 0")
    trainer = _trainer(tmp_path)
    before = [v.numpy().copy() for v in trainer.model.trainable_variables]
    trainer.fit()
    delta = np.sqrt(sum(np.sum((v.numpy() - b) ** 2) for v, b in zip(trainer.model.trainable_variables, before)))
    assert 0 < delta <= 1e-3 * 1.001


@pytest.mark.slow
def test_bad_label_value_is_a_clear_error(tmp_path, configure):
    @DATASETS.register("test_bad_labels", override=True)
    def test_bad_labels(split="train"):
        label = np.zeros((32, 32), np.uint8)
        label[5, 5] = 7
        ds = tf.data.Dataset.from_tensors({"image": np.zeros((32, 32, 3), np.uint8), "label": label}).repeat(8)
        return ds, DatasetInfo(num_classes=3, name="test_bad_labels", num_examples={split: 8})

    configure("train.dataset = 'test_bad_labels'")
    with pytest.raises(SegtrainError) as e:
        train(str(tmp_path))
    assert str(e.value).startswith("Label value 7 in dataset 'test_bad_labels' split 'train' is neither a class id in [0, 2]")
    assert "node" not in str(e.value)


@pytest.mark.slow
def test_model_breaking_the_contract_is_rejected(tmp_path, configure):
    @MODELS.register("test_wrong_channels", override=True)
    def test_wrong_channels(num_classes):
        inputs = keras.Input((None, None, 3))
        return keras.Model(inputs, keras.layers.Conv2D(num_classes + 1, 1)(inputs))

    @MODELS.register("test_wrong_size", override=True)
    def test_wrong_size(num_classes):
        inputs = keras.Input((None, None, 3))
        return keras.Model(inputs, keras.layers.Conv2D(num_classes, 2, strides=2)(inputs))

    configure("train.model = 'test_wrong_channels'")
    with pytest.raises(SegtrainError, match=r"returned logits of shape \(1, 32, 32, 5\), but dataset 'shapes' has 4 classes"):
        train(str(tmp_path / "a"))
    configure("train.model = 'test_wrong_size'")
    with pytest.raises(SegtrainError, match=r"returned logits of size \(16, 16\) for images of size \(32, 32\)"):
        train(str(tmp_path / "b"))


def test_missing_model_dir_is_a_clear_error(configure):
    configure()
    with pytest.raises(SegtrainError, match="--model_dir is required"):
        train("")


def test_unknown_plugin_name_in_config(tmp_path, configure):
    configure("train.loss = 'cross_entopy'")
    with pytest.raises(ValueError, match="Unknown loss 'cross_entopy'. Did you mean 'cross_entropy'"):
        train(str(tmp_path))


def test_best_metric_must_be_computed_and_scalar(configure):
    configure("train.best_metric = 'miou'")
    with pytest.raises(SegtrainError, match="train.best_metric='miou' is not among train.metrics"):
        ExperimentConfig()
    configure("train.metrics = ('mean_iou', 'per_class_accuracy')", "train.best_metric = 'per_class_accuracy'")
    with pytest.raises(SegtrainError, match="is a per-class metric"):
        ExperimentConfig()


@pytest.mark.parametrize("binding,message", [
    ("train.checkpoint_every = -2", "train.checkpoint_every must be None or an integer >= 1, got -2"),
    ("train.eval_every = -1", "train.eval_every must be an integer >= 0, got -1"),
    ("train.num_image_panels = -1", "train.num_image_panels must be an integer >= 0"),
    ("train.num_steps = 'abc'", "train.num_steps must be an integer >= 1, got 'abc'"),
    ("train.clip_norm = 0", "train.clip_norm must be None or a number > 0"),
])
def test_bad_train_settings(configure, binding, message):
    configure(binding)
    with pytest.raises(SegtrainError, match=message):
        ExperimentConfig()


def _first_losses(model_dir, configure, *bindings):
    """The per-step losses of one 3-step window of a deterministic SGD run, with colour jitter."""
    configure("pipeline.deterministic = True", "optimizer.name = 'sgd'", "learning_rate.base = 0.01",
              "train.num_image_panels = 0", "pipeline.brightness = 0.1", "pipeline.contrast = (0.8, 1.2)",
              "pipeline.hue = 0.05", *bindings)
    trainer = _trainer(model_dir)
    iterator, _ = trainer.iterator(trainer.config.seed)
    return trainer, trainer.train_window(iterator, 0, 3, first=True).losses


def test_colour_on_device_trains_as_the_pipeline_finished_batches_do(tmp_path, configure):
    _, host = _first_losses(tmp_path / "host", configure)
    trainer, device = _first_losses(tmp_path / "device", configure, "pipeline.colour_on_device = True")
    spec = trainer.strategy.distribute_datasets_from_function(
        lambda c: trainer.experiment.train_dataset(0, c)).element_spec
    assert spec["image"].dtype == tf.uint8 and set(spec["colour"]) == {"brightness", "contrast", "hue"}
    # The same crops and draws: only the crops' rounding to whole levels differs.
    np.testing.assert_allclose(device, host, rtol=2e-3)


@pytest.mark.slow
def test_drop_actions_leaves_actions_out_by_name(tmp_path, configure):
    configure("train.drop_actions = ('image_panels', 'hparams')")
    train(str(tmp_path / "run"))
    assert "examples/0" not in read_tags(str(tmp_path / "run" / "eval"))
    assert "mean_iou" in read_tags(str(tmp_path / "run" / "eval"))
    assert not list((tmp_path / "run").glob("events.out.tfevents.*.hparams"))
    configure("train.drop_actions = ('panels',)")
    with pytest.raises(SegtrainError, match=r"train.drop_actions names 'panels', which this run does not have; its "
                                            r"actions: write_config, on_non_finite, train_summaries, progress_line, "
                                            r"preemption, save_checkpoints, evaluate, eval_summaries, image_panels, "
                                            r"keep_best, early_stopping, hparams."):
        train(str(tmp_path / "other"))
