"""Pretrained ImageNet weights of the built-in backbones: fetched on request into the Keras cache.

``backbones.<name>.weights = 'imagenet'`` loads keras.applications' ImageNet weights
(``include_top=False``) of that backbone. They live in the Keras cache
(``$KERAS_HOME/models``, ``~/.keras/models`` by default), where keras.applications keeps them
too. A file missing there is downloaded from keras.applications' own address and checked
against its published hash; nothing is downloaded unless a setting asks for ``'imagenet'``.

Compute nodes are often offline: ``segtrain weights fetch resnet50 convnext_tiny`` fills the
cache on a machine with internet access (a login node); an offline node that lacks a file stops
with one message that names that command.
"""

from __future__ import annotations

import dataclasses
import os

from segtrain.errors import SegtrainError

KERAS_APPLICATIONS = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One weights file: its name in the Keras cache, where it is downloaded from, its hash
    (md5 or sha256, as keras.utils.get_file checks it)."""

    file: str
    url: str
    file_hash: str


def _file(folder: str, file: str, file_hash: str) -> Pretrained:
    return Pretrained(file, f"{KERAS_APPLICATIONS}{folder}/{file}", file_hash)


# keras.applications' include_top=False files (the same addresses and hashes its own code uses;
# tests/models/test_pretrained.py checks them against Keras').
IMAGENET: dict[str, Pretrained] = {
    "resnet50": _file("resnet", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "4d473c1dd8becc155b73f8504c6f6626"),
    "resnet101": _file("resnet", "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", "88cf7a10940856eca736dc7b7e228a21"),
    "resnet50_v2": _file("resnet", "resnet50v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "fac2f116257151a9d068a22e544a4917"),
    "resnet101_v2": _file("resnet", "resnet101v2_weights_tf_dim_ordering_tf_kernels_notop.h5", "c0ed64b8031c3730f411d2eb4eea35b5"),
    "vgg16": _file("vgg16", "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", "6d6bbae143d832006294945121d1f1fc"),
    "convnext_tiny": _file("convnext", "convnext_tiny_notop.h5", "d547c096cabd03329d7be5562c5e14798aa39ed24b474157cef5e85ab9e49ef1"),
    "convnext_small": _file("convnext", "convnext_small_notop.h5", "6fc8009faa2f00c1c1dfce59feea9b0745eb260a7dd11bee65c8e20843da6eab"),
    "convnext_base": _file("convnext", "convnext_base_notop.h5", "40a20c5548a5e9202f69735ecc06c990e6b7c9d2de39f0361e27baeb24cb7c45"),
    "efficientnetv2_b0": _file("efficientnet_v2", "efficientnetv2-b0_notop.h5", "893217f2bb855e2983157299931e43ff"),
    "efficientnetv2_b1": _file("efficientnet_v2", "efficientnetv2-b1_notop.h5", "0e80663031ca32d657f9caa404b6ec37"),
    "efficientnetv2_b2": _file("efficientnet_v2", "efficientnetv2-b2_notop.h5", "1dfe2e7a5d45b6632553a8961ea609eb"),
    "efficientnetv2_b3": _file("efficientnet_v2", "efficientnetv2-b3_notop.h5", "f6abf7b5849ac99a89b50dd3fd532856"),
    "efficientnetv2_s": _file("efficientnet_v2", "efficientnetv2-s_notop.h5", "af0682fb74e8c54910f2d4393339c070"),
    "mobilenetv3_small": _file("mobilenet_v3", "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", "d3e8ec802a04aa4fc771ee12a9a9b836"),
    "mobilenetv3_large": _file("mobilenet_v3", "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", "07fb09a5933dd0c8eaafa16978110389"),
}


def cache_dir() -> str:
    """The Keras cache's folder of model weights: ``$KERAS_HOME/models`` or ``~/.keras/models``."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return os.path.join(home, "models")


def cached_path(name: str) -> str:
    """Where backbone ``name``'s ImageNet weights are (or would be) in the Keras cache."""
    return os.path.join(cache_dir(), entry(name).file)


def entry(name: str) -> Pretrained:
    """The ImageNet weights file of backbone ``name``.

    Raises:
      SegtrainError: a backbone without ImageNet weights (naming those that have them).
    """
    if name not in IMAGENET:
        raise SegtrainError(f"backbones.{name}.weights='imagenet': segtrain knows no ImageNet weights of "
                            f"{name!r}; the backbones with them are {', '.join(sorted(IMAGENET))}. "
                            f"Give a local weights file instead.")
    return IMAGENET[name]


def fetch(name: str, progress: bool = True) -> str:
    """Downloads backbone ``name``'s ImageNet weights into the Keras cache unless already there;
    returns the file's path. The download is checked against the published hash.

    Raises:
      SegtrainError: an unknown backbone, no connection, or a file whose hash does not match.
    """
    import keras

    pretrained = entry(name)
    path = cached_path(name)
    if os.path.isfile(path):
        return path
    os.makedirs(cache_dir(), exist_ok=True)
    try:
        keras.utils.get_file(pretrained.file, pretrained.url, file_hash=pretrained.file_hash,
                             cache_dir=os.path.dirname(cache_dir()), cache_subdir="models")
    except Exception as e:  # keras wraps URLError/HTTPError in Exception; a bad hash is a ValueError
        if os.path.isfile(path):  # never leave a file that did not pass the check
            os.remove(path)
        detail = " ".join(str(e).split())[:300]
        raise SegtrainError(f"cannot download the ImageNet weights of {name} from {pretrained.url} "
                            f"into {cache_dir()}: {detail}") from None
    return path


def resolve(name: str, weights: str) -> str:
    """The local file of ``backbones.<name>.weights``: a path as given, or for ``'imagenet'`` the
    file in the Keras cache, fetched now if it is missing.

    Raises:
      SegtrainError: 'imagenet' on a machine that cannot download a missing file: the message
        names ``segtrain weights fetch``.
    """
    if weights != "imagenet":
        return weights
    try:
        return fetch(name)  # the cached file, when it is there
    except SegtrainError as e:
        raise SegtrainError(
            f"backbones.{name}.weights='imagenet': {entry(name).file} is not in the Keras cache "
            f"({cache_dir()}) and could not be downloaded ({e}). On a machine with internet access run `segtrain weights fetch {name}` "
            f"and make its cache visible here (the same KERAS_HOME, or copy the file into {cache_dir()})."
        ) from None
