"""Runs under one logdir are sessions of TensorBoard's HParams dashboard: bindings and final metrics."""

from __future__ import annotations

import glob
import json
import os

import pytest
import tensorflow as tf
from tensorboard import context as tb_context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import (api_pb2, backend_context, list_session_groups, metadata,
                                         plugin_data_pb2)

from segtrain.experiment import ExperimentConfig
from segtrain.train.hparams import SUFFIX, HParams, flatten_bindings
from tests.conftest import copy_run


def _session(run_dir) -> tuple:
    """(session start info, session end info or None, number of files) of a run directory."""
    files = glob.glob(os.path.join(run_dir, f"events.out.tfevents.*{SUFFIX}"))
    found = {}
    for path in files:
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME:
                    content = value.metadata.plugin_data.content
                    found[value.tag] = plugin_data_pb2.HParamsPluginData.FromString(content)
    end = found.get(metadata.SESSION_END_INFO_TAG)
    return (found[metadata.SESSION_START_INFO_TAG].session_start_info,
            end.session_end_info if end else None, len(files))


def _plain(start_info) -> dict:
    """{name: Python value}; fails on a value that is not a number, string or bool."""
    out = {}
    for name, value in start_info.hparams.items():
        kind = value.WhichOneof("kind")
        assert kind in ("number_value", "string_value", "bool_value"), (name, value)
        out[name] = getattr(value, kind)
    return out


def _dashboard(logdir: str) -> dict[str, api_pb2.SessionGroup]:
    """The session groups TensorBoard's HParams dashboard lists for ``logdir``, by session name."""
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(logdir)
    multiplexer.Reload()
    context = backend_context.Context(base_plugin.TBContext(
        data_provider=data_provider.MultiplexerDataProvider(multiplexer, logdir), multiplexer=multiplexer))
    request = api_pb2.ListSessionGroupsRequest(allowed_statuses=list(api_pb2.Status.values()), slice_size=100)
    response = list_session_groups.Handler(tb_context.RequestContext(), context, "", request).run()
    return {session.name: group for group in response.session_groups for session in group.sessions}


def test_bindings_become_hparams_named_as_in_gin_files(configure):
    configure()  # registers every plugin, so bare names get their registry kind
    config = "\n".join([
        "# Macros:",
        "SIZE = (32, 32)",
        "train.batch_size = 4",
        "train.clip_norm = None",
        "train.xla = False",
        "train.crop = %SIZE",
        "unet.depth = 2",  # gin's shortest unique name of models.unet
        "losses.dice.smooth = 1.0",
        "optimizer.schedule = @schedules.poly",
        "eval/pipeline.weights = \\",
        "    {'a': [1, @adam()], 'b': None, 'c': 1e999}",
    ])
    assert flatten_bindings(config) == {
        "SIZE": "(32, 32)",
        "train.batch_size": 4,
        "train.clip_norm": "None",
        "train.xla": False,
        "train.crop": "%SIZE",
        "models.unet.depth": 2,
        "losses.dice.smooth": 1.0,
        "optimizer.schedule": "@schedules.poly",
        "eval/pipeline.weights": "{'a': [1, @optimizers.adam()], 'b': None, 'c': inf}",
    }


def test_runs_under_one_logdir_are_sessions_with_their_final_metrics(trained_run, tmp_path, configure):
    logdir = tmp_path / "runs"
    a = copy_run(trained_run, logdir / "a")
    b = copy_run(trained_run, logdir / "b")

    start_a, end_a, _ = _session(a)
    hparams_a = _plain(start_a)
    assert start_a.group_name == str(trained_run)  # the trial id: the run's absolute path (a is a copy)
    assert end_a.status == api_pb2.STATUS_SUCCESS
    assert hparams_a["train.batch_size"] == 4 and hparams_a["train.num_steps"] == 6
    assert hparams_a["train.model"] == "unet" and hparams_a["models.unet.depth"] == 2
    assert hparams_a["train.clip_norm"] == "None"
    assert hparams_a["pipeline.crop_size"] == "(32, 32)"
    assert hparams_a["distribute.strategy"] == "auto"  # a flag of `segtrain train` is a binding too
    assert hparams_a["train.xla"] is False

    # b restarts with other bindings and has not finished yet: its summary is replaced, not doubled.
    configure("train.num_steps = 9", "BATCH = 4", "train.batch_size = %BATCH")
    ExperimentConfig()  # what training reads from train.*, now in gin's operative config
    restart = HParams(b)
    restart.start(6)
    restart.close()
    start_b, end_b, files = _session(b)
    hparams_b = _plain(start_b)
    assert files == 1 and start_b.group_name == b and end_b is None
    assert hparams_b["train.num_steps"] == 9
    assert hparams_b["train.batch_size"] == "%BATCH" and hparams_b["BATCH"] == 4

    # What the dashboard shows: a session per run, with the run's final evaluation as metrics.
    groups = _dashboard(str(logdir))
    assert set(groups) == {"a", "b"}
    assert groups["a"].sessions[0].status == api_pb2.STATUS_SUCCESS
    assert groups["b"].sessions[0].status == api_pb2.STATUS_UNKNOWN  # still running, or stopped
    assert groups["b"].hparams["train.num_steps"].number_value == 9
    with open(os.path.join(a, "eval_results_validation.json")) as f:
        final = json.load(f)
    for name in ("a", "b"):
        metrics = {(m.name.group, m.name.tag): m for m in groups[name].sessions[0].metric_values}
        for tag in ("mean_iou", "pixel_accuracy", "loss"):
            assert metrics["eval", tag].value == pytest.approx(final[tag], rel=1e-6)
            assert metrics["eval", tag].training_step == final["step"]
