"""The flags several commands share, and the one way a command's flags become gin bindings.

Each command module owns its flags (``define_flags``) and its ``main``; ``segtrain.cli`` is the
dispatch table that parses them.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from absl import flags


def gin_flags(fv):
    flags.DEFINE_multi_string("gin_file", [], "Gin file; may be repeated, later files win.", flag_values=fv)
    flags.DEFINE_multi_string("gin_param", [], "Gin binding such as 'train.num_steps = 100'; wins over files.",
                              flag_values=fv)


def verbosity_flag(fv):
    flags.DEFINE_integer("verbosity", None, "Also show TensorFlow's own log lines, from this level up (0: INFO; "
                         "default: none, only segtrain's lines).", flag_values=fv)


def input_flag(fv):
    flags.DEFINE_string("input", None, "Images: files, directories or glob patterns, comma-separated.", flag_values=fv)


def trained_run_flags(fv, what="evaluate"):
    gin_flags(fv)
    flags.DEFINE_string("model_dir", None, "The run directory `segtrain train` wrote.", flag_values=fv)
    flags.DEFINE_string("checkpoint", "best", "Which checkpoint to restore: best (the latest when no best was kept), "
                        "latest, or one by name (ckpt-600, best/ckpt-400) or path (gin: "
                        f"{what}.checkpoint).", flag_values=fv)


def inference_flags(fv, what):
    flags.DEFINE_enum("mode", None, ["whole", "slide"], "Whole images at once, or sliding windows of --crop_size "
                      "every --stride (gin: inference.mode; default whole).", flag_values=fv)
    flags.DEFINE_list("crop_size", None, "Sliding-window size H,W (gin: inference.crop_size).", flag_values=fv)
    flags.DEFINE_list("stride", None, "Sliding-window step H,W (default: two thirds of --crop_size; gin: "
                      "inference.stride).", flag_values=fv)
    flags.DEFINE_list("scales", None, "Test-time scales, e.g. 0.75,1.0,1.25: the softmax of every view is averaged "
                      "(gin: inference.scales).", flag_values=fv)
    flags.DEFINE_bool("flip", None, "Also infer on the left-right flipped image and average (gin: inference.flip).",
                      flag_values=fv)
    flags.DEFINE_string("postprocess", None, "A registered post-processor, e.g. dense_crf (`segtrain list` shows "
                        f"them; gin: {what}.postprocess and postprocessors.NAME.*).", flag_values=fv)


def own_flags(fv: flags.FlagValues) -> dict:
    """The flags given on the command line, but the ones every command shares (the run's
    directory, the gin files and bindings, the verbosity): what becomes the command's gin bindings."""
    shared = ("model_dir", "gin_file", "gin_param", "verbosity")
    return given(fv, [name for name in fv if name not in shared and not name.startswith("help")])


def given(fv: flags.FlagValues, names: Iterable[str]) -> dict:
    """The flags among ``names`` given on the command line, by name."""
    return {name: fv[name].value for name in names if name in fv and fv[name].present}


def bindings(scope: str, values: Mapping[str, object], rename: Mapping[str, str] | None = None) -> list[str]:
    """Command-line flag values as gin bindings of ``scope`` (``--split=val``: ``evaluate.split =
    'val'``), so a flag and its gin setting are one setting, and the flag wins (it is parsed last).
    ``rename`` maps a flag to its parameter where the names differ (``--class``: class_name)."""
    rename = rename or {}
    return [f"{scope}.{rename.get(name, name)} = {value!r}" for name, value in values.items()]
