"""The run's gin bindings in TensorBoard's HParams dashboard, to compare runs side by side.

TensorBoard makes a *session* of every run directory that holds a session-start summary, and
takes the session's metrics from the scalars of its subdirectories: under
``tensorboard --logdir runs/``, ``runs/a`` is session ``a``, and its metric ``mean_iou`` of group
``eval`` is the last ``mean_iou`` in ``runs/a/eval``. So the summary goes into model_dir itself,
above train/ and eval/, and the final metrics are the final evaluation that EvalSummaries writes
at the last step; writing them again would only double the last point of every eval chart.

No experiment summary (``hp.hparams_config``) is written: TensorBoard takes the first one it finds
for every run under the logdir, so one run's list of bindings would hide another's (a different
model's settings). Without it, TensorBoard gathers the union of every session's hparams, marks
those whose values differ, and lists every train/ and eval/ scalar as a metric.
"""

from __future__ import annotations

import math
import os
import time

import gin
import tensorflow as tf
from gin import config_parser
from tensorboard.plugins.hparams import api as hp
from tensorboard.plugins.hparams import api_pb2
from tensorboard.plugins.hparams import summary as hp_summary

import registry
from segtrain import run_dir
from segtrain.errors import warn
from segtrain.train import summaries
from segtrain.train.loop import Action

# The session summary's event files in model_dir end with this, so a restart finds its own.
SUFFIX = run_dir.HPARAMS_SUFFIX

Value = bool | int | float | str


class HParams(Action):
    """Writes the operative gin bindings as an HParams session into model_dir (chief only).

    At the start, after model, data, loss and optimizer are built (gin lists only what was
    called). A restarted run replaces the summary of its earlier start: TensorBoard reads the
    first session summary of a directory and ignores later ones, so a second one would leave
    the bindings of the first start on show (train.num_steps before it was raised, say), while
    the run now trains with those of the restart, the ones operative_config.gin holds too.
    The trial id is the run directory's absolute path: sessions sharing a trial id are merged
    into one row whose metrics are averaged, and base names repeat across runs (runs/lr1/seed0,
    runs/lr2/seed0).

    At a normal end it also records the session as finished (status Success), so the
    dashboard's status filter tells finished runs from running, stopped or failed ones.
    """

    def __init__(self, model_dir: str):
        self.model_dir = model_dir
        self.writer = None

    def start(self, step: int) -> None:
        old = tf.io.gfile.glob(os.path.join(self.model_dir, f"events.out.tfevents.*{SUFFIX}"))
        for path in old:  # first: a start that dies before writing leaves no summary of other bindings
            try:
                tf.io.gfile.remove(path)
            except tf.errors.OpError as e:
                warn(f"Could not remove {path} ({e.message}): TensorBoard's HParams dashboard may show "
                     "the bindings of this run's earlier start. Remove the file by hand.")
        self.writer = summaries.file_writer(self.model_dir, filename_suffix=SUFFIX)
        with self.writer.as_default():
            hp.hparams(flatten_bindings(gin.operative_config_str()), trial_id=trial_id(self.model_dir))
        summaries.flush(self.writer, self.model_dir)

    def end(self, step: int) -> None:
        summary = hp_summary.session_end_pb(api_pb2.STATUS_SUCCESS, end_time_secs=time.time())
        with self.writer.as_default():
            tf.summary.experimental.write_raw_pb(summary.SerializeToString(), step=step)
        summaries.flush(self.writer, self.model_dir)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def trial_id(model_dir: str) -> str:
    """The run directory as an absolute path (URLs such as gs://... as given)."""
    return model_dir if "://" in model_dir else os.path.abspath(model_dir)


def flatten_bindings(config: str) -> dict[str, Value]:
    """Every binding of a gin config text, named as in a gin file, as an HParams value.

    Names are ``scope/configurable.parameter`` with a plugin's registry kind in front
    (``models.unet.depth``, although gin writes the shortest unique ``unet.depth``, which changes
    with the plugins installed); macros keep their name. Bools, ints, floats and strings stay
    as they are. Everything else becomes the text a gin file would hold: ``None`` as "None",
    ``(32, 32)`` as "(32, 32)", references and macros as "@name", "@name()", "%name". One
    column per binding compares runs better than a column per element: a crop size is one
    choice, and lists of different lengths (class weights) would scatter over columns.
    """
    values = {}
    for statement in config_parser.ConfigParser(config, _Readable()):
        if not isinstance(statement, config_parser.BindingStatement):
            continue
        if statement.arg_name:
            name = f"{_canonical(statement.selector)}.{statement.arg_name}"
        else:  # a macro: NAME = value
            name = statement.selector
        if statement.scope:
            name = f"{statement.scope}/{name}"
        values[name] = _value(statement.value)
    return values


class _Text(str):
    """A reference or macro inside a value: shown as written, without quotes."""

    def __repr__(self) -> str:
        return str(self)


class _Readable(config_parser.ParserDelegate):
    """Keeps references and macros as their gin text instead of resolving them."""

    def configurable_reference(self, scoped_configurable_name: str, evaluate: bool) -> _Text:
        scope, _, selector = scoped_configurable_name.rpartition("/")
        name = f"{scope}/{_canonical(selector)}" if scope else _canonical(selector)
        return _Text(f"@{name}()" if evaluate else f"@{name}")

    def macro(self, macro_name: str) -> _Text:
        return _Text(f"%{macro_name}")


def _canonical(selector: str) -> str:
    """``unet`` -> ``models.unet``: a plugin under its registry kind, as the registry binds it."""
    if "." in selector:
        return selector
    # gin writes a bare name only when it is unique, so at most one registry holds it.
    kinds = [kind for kind, plugins in registry.all_registries().items() if selector in plugins]
    return f"{kinds[0]}.{selector}" if kinds else selector


def _value(value) -> Value:
    if isinstance(value, _Text):
        return str(value)
    if isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # JSON has no nan or inf
    return repr(value)
