"""Gin parsing for every command, once every configurable of every layer is registered."""

from __future__ import annotations

from typing import Sequence

from segtrain import config

# Importing them registers every configurable a gin file may bind: train.*, pipeline.*,
# optimizer.*, learning_rate.*, distribute.* (the trainer's) and evaluate.*.
from segtrain.commands import evaluate  # noqa: F401
from segtrain.train import trainer  # noqa: F401


def parse_config(files: Sequence[str] = (), bindings: Sequence[str] = ()) -> None:
    """Parses gin files (in order) and bindings (which win).

    Raises:
      SegtrainError: a missing file or a binding gin cannot apply, naming the file or binding.
    """
    config.parse(files, bindings)
