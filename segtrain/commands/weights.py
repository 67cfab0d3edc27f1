"""`segtrain weights`: the ImageNet weights of the built-in backbones in the Keras cache.

    segtrain weights list                          # each backbone's file and whether it is cached
    segtrain weights fetch resnet50 convnext_tiny  # download what is missing (on a login node)

``backbones.<name>.weights = 'imagenet'`` reads the same cache (segtrain.models.pretrained); a
compute node without internet access needs its files fetched beforehand.
"""

from __future__ import annotations

import difflib
import os

from absl import flags

from segtrain.errors import SegtrainError

POSITIONAL = "arguments"  # `segtrain weights ACTION [NAME ...]`: the words after the command
ACTIONS = ("list", "fetch")


def define_flags(fv):
    flags.DEFINE_multi_string(POSITIONAL, [], "`list`, or `fetch` and the backbones to fetch (any number of names; "
                              "`fetch all` fetches every one).", flag_values=fv)


def listing() -> str:
    from segtrain.models import pretrained

    rows = [f"ImageNet weights of the built-in backbones (keras.applications, include_top=False) in "
            f"{pretrained.cache_dir()}:"]
    for name, entry in sorted(pretrained.IMAGENET.items()):
        cached = os.path.isfile(pretrained.cached_path(name))
        rows.append(f"  {name:<20} {'cached ' if cached else 'missing'}  {entry.file}")
    rows.append("`segtrain weights fetch NAME ...` downloads the missing ones; "
                "`backbones.NAME.weights = 'imagenet'` uses them.")
    return "\n".join(rows)


def fetch(names: list[str]) -> list[str]:
    """Fetches the ImageNet weights of ``names`` (``['all']``: every backbone); returns their paths.

    Raises:
      SegtrainError: no or an unknown name (checked before anything downloads), a failed download.
    """
    from segtrain.models import pretrained

    known = sorted(pretrained.IMAGENET)
    if names == ["all"]:
        names = known
    if not names:
        raise SegtrainError(f"`segtrain weights fetch` needs the backbones to fetch, e.g. `segtrain weights fetch "
                            f"resnet50`; they are {', '.join(known)} (or `all`).")
    for name in names:
        if name not in pretrained.IMAGENET:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SegtrainError(f"no ImageNet weights of backbone {name!r}.{hint} Those with weights: "
                                f"{', '.join(known)}.")
    paths = []
    for name in names:
        cached = os.path.isfile(pretrained.cached_path(name))
        if not cached:
            print(f"{name}: downloading {pretrained.IMAGENET[name].url}", flush=True)
        path = pretrained.fetch(name)
        print(f"{name}: {path} ({'already cached' if cached else 'downloaded, hash checked'})", flush=True)
        paths.append(path)
    return paths


def main(fv: flags.FlagValues) -> int:
    """`segtrain weights` from its parsed flags and words."""
    words = list(fv[POSITIONAL].value)
    if not words or words[0] not in ACTIONS:
        raise SegtrainError(f"`segtrain weights` takes an action: {' or '.join(ACTIONS)} "
                            f"(got {words[0] if words else 'none'!r}).")
    if words[0] == "list":
        if words[1:]:
            raise SegtrainError(f"`segtrain weights list` takes no names (got {' '.join(words[1:])}).")
        print(listing())
    else:
        fetch(words[1:])
    return 0
