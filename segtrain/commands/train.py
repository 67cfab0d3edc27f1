"""`segtrain train`: parse the experiment's gin configuration and train it."""

from __future__ import annotations

from typing import Sequence

from absl import flags

from segtrain import run_dir
from segtrain.commands.common_flags import gin_flags, given, verbosity_flag
from segtrain.commands.configure import parse_config
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


def define_flags(fv):
    gin_flags(fv)
    flags.DEFINE_string("model_dir", None, "Run directory: checkpoints, TensorBoard logs, configs, results.",
                        flag_values=fv)
    flags.DEFINE_enum("strategy", "auto", ["auto", "one_device", "mirrored", "multi_worker"],
                      "tf.distribute strategy; auto picks multi-worker for a TF_CONFIG/SLURM cluster, mirrored "
                      "for 2+ GPUs, else one device (gin: distribute.strategy).", flag_values=fv)
    flags.DEFINE_integer("cpu_replicas", 0, "Split the CPU into N logical devices and mirror over them (machines "
                         "without GPUs, tests; gin: distribute.cpu_replicas).", lower_bound=0, flag_values=fv)
    flags.DEFINE_enum("precision", "float32", ["float32", "mixed_float16", "mixed_bfloat16"],
                      "Numeric precision (gin: train.precision).", flag_values=fv)
    flags.DEFINE_bool("xla", False, "Compile the per-replica step with XLA (gin: train.xla).", flag_values=fv)
    flags.DEFINE_list("profile_steps", None, "Trace training steps A..B (1-based, inclusive, as the progress "
                      "line counts) with the TensorFlow profiler into MODEL_DIR/train for TensorBoard's "
                      "Profile tab (pip install 'segtrain[profile]'). Windows of train.steps_per_loop steps "
                      "end after step A-1 and after B, so the trace holds exactly A..B, one step marker per "
                      "window; B past train.num_steps stops there (gin: train.profile_steps = (A, B)).",
                      flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain train` from its parsed flags."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, given(fv, FLAG_BINDINGS))
