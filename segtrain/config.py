"""Parsing gin files and bindings into one clear error when something is wrong."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from typing import Sequence

import gin

import registry
from segtrain import compat
from segtrain.errors import SegtrainError


def parse(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
    """Loads every plugin, then parses gin files (in order) and bindings (which win).

    The framework's own configurables (train.*, pipeline.*, optimizer.*...) must be registered
    first: segtrain.commands.configure.parse_config does that.

    ``include`` statements in a gin file are looked up next to the file and in its parent
    directory, so files under gin/ include each other as 'models/unet.gin'.

    Raises:
      SegtrainError: a missing file or a binding gin cannot apply, naming the file or binding.
    """
    registry.load_all()
    for path in files:
        if not os.path.isfile(path):
            raise SegtrainError(f"--gin_file={path}: no such file.")
        here = os.path.dirname(os.path.abspath(path))
        for search in (here, os.path.dirname(here)):
            gin.add_config_file_search_path(search)
    quiet = _DropMissingIncludeNoise()
    logging.getLogger().addFilter(quiet)
    try:
        gin.parse_config_files_and_bindings(list(files), list(bindings), finalize_config=False)
    except ImportError as e:
        lines = [line.strip() for line in str(e).strip().splitlines()]
        where = f" ({' '.join(lines[1:3])})" if len(lines) > 1 else ""
        raise SegtrainError(
            f"Bad gin configuration: an `import` in a gin file failed: {lines[0]}{where}. Install "
            "the package that provides it, or fix the import line."
        ) from None
    except (ValueError, IOError, SyntaxError) as e:
        raise SegtrainError(_explain(e)) from None
    finally:
        logging.getLogger().removeFilter(quiet)


class _DropMissingIncludeNoise(logging.Filter):
    """gin tries each include on the Python path before the search paths, and logs an ERROR
    for every miss even when the include then resolves; a real miss still raises."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def _explain(error: Exception) -> str:
    text = str(error).strip()
    first = text.splitlines()[0]
    where = " ".join(line.strip() for line in text.splitlines()[1:3])
    hint = ""
    denied = re.search(r"Configurable '([\w.]+)' has denylisted kwarg '(\w+)'", first)
    if denied:
        return (f"Bad gin configuration: {denied.group(1)}.{denied.group(2)} is passed by segtrain itself (from the "
                f"dataset, the run or the model), not set in gin: remove that binding." + (f" ({where})" if where else ""))
    m = re.search(r"Configurable '([\w.]+)' doesn't have a parameter named '(\w+)'", first)
    moved = m and _moved(m.group(1), m.group(2))
    if moved:
        return f"Bad gin configuration: {m.group(1)}.{m.group(2)} is now {moved}." + (f" ({where})" if where else "")
    if m:
        params = _parameters(m.group(1))
        close = difflib.get_close_matches(m.group(2), params, n=2)
        hint = f" Did you mean {' or '.join(repr(f'{m.group(1)}.{c}') for c in close)}?" if close else ""
        if params:
            hint += f" Its parameters: {', '.join(params)}."
    m = re.search(r"No configurable matching '([\w.]+)'", first)
    if m:
        close = difflib.get_close_matches(m.group(1), _configurables(), n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        hint += " `segtrain list` shows every plugin and its parameters."
    return f"Bad gin configuration: {first}{hint}" + (f" ({where})" if where else "")


# Settings that moved to the plugin they belong to (an optimizer's, a schedule's, a backbone's).
_MOVED = {
    "optimizer.momentum": "optimizers.sgd.momentum",
    "optimizer.nesterov": "optimizers.sgd.nesterov",
    "optimizer.weight_decay": "optimizers.<name>.weight_decay (e.g. optimizers.adamw.weight_decay)",
    "optimizer.beta_1": "optimizers.adam.beta_1 (or optimizers.adamw.beta_1)",
    "optimizer.beta_2": "optimizers.adam.beta_2 (or optimizers.adamw.beta_2)",
    "optimizer.epsilon": "optimizers.adam.epsilon (or optimizers.adamw.epsilon)",
    "learning_rate.end": "schedules.poly.end (or schedules.cosine.end)",
    "learning_rate.power": "schedules.poly.power",
    "backbone_weights": "backbones.<backbone>.weights (e.g. backbones.resnet50.weights)",
    "freeze_backbone": "backbones.<backbone>.freeze",
    "freeze_batch_norm": "backbones.<backbone>.freeze_batch_norm",
    # One setting for every batch norm of a model, its backbone's included.
    "synchronized_batch_norm": "train.synchronized_batch_norm",
}


def _moved(selector: str, parameter: str) -> str | None:
    """Where a setting of an earlier segtrain went, if ``selector.parameter`` is one."""
    short = selector.rsplit(".", 1)[-1]
    if f"{short}.{parameter}" in _MOVED:
        return _MOVED[f"{short}.{parameter}"]
    if "." not in parameter and parameter in _MOVED and short in registry.MODELS:
        return _MOVED[parameter]
    return None


def _configurables() -> list[str]:
    try:  # the names help only the error message
        return compat.gin_configurable_names()
    except Exception:
        return []


def _parameters(selector: str) -> list[str]:
    try:
        function = compat.gin_configurable_function(selector)
        return [p for p in inspect.signature(function).parameters if p not in ("self", "args", "kwargs")]
    except Exception:
        return []
