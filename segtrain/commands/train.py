"""`segtrain train`: parse the experiment's gin configuration and train it."""

from __future__ import annotations

from typing import Sequence

from segtrain.commands.configure import parse_config
from segtrain import run_dir
from segtrain.errors import SegtrainError
from segtrain.train.trainer import train

# Flags of `segtrain train` that are gin bindings too; a flag given on the command line wins.
FLAG_BINDINGS = {"strategy": "distribute.strategy", "cpu_replicas": "distribute.cpu_replicas",
                 "precision": "train.precision", "xla": "train.xla", "profile_steps": "train.profile_steps"}


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Trains the experiment of ``gin_files`` and ``gin_params``.

    Args:
      model_dir: the run's directory.
      gin_files, gin_params: the configuration; later files and the params win.
      flags: command-line flags that set gin bindings (FLAG_BINDINGS), by flag name.
    """
    run_dir.require(model_dir)
    if not gin_files and not gin_params:
        raise SegtrainError("Nothing to train: give --gin_file (e.g. gin/quickstart.gin) and/or --gin_param.")
    bindings = [f"{FLAG_BINDINGS[name]} = {gin_value(name, value)!r}" for name, value in flags.items()]
    parse_config(gin_files, [*gin_params, *bindings])
    train(model_dir)
    print(f"Done. TensorBoard: tensorboard --logdir {model_dir}")
    return 0


def gin_value(name: str, value):
    """A flag's value as its gin binding takes it: --profile_steps=20,30 is the tuple (20, 30).

    A part that is not an integer stays text, for train.profile_steps to refuse by name.
    """
    if name != "profile_steps":
        return value

    def number(text: str):
        try:
            return int(text)
        except ValueError:
            return text

    return tuple(number(v) for v in value)
