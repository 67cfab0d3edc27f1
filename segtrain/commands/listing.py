"""`segtrain list`: every registered plugin with its one-line doc and its arguments."""

from __future__ import annotations

from absl import flags

import registry
from segtrain.errors import SegtrainError


def text(models_only: bool = False, details: bool = False, backbones_only: bool = False) -> str:
    """The listing; ``details``: the model (or backbone) table of docs/pages/models.md instead
    (builds every model or backbone)."""
    registry.load_all()
    if details:
        from segtrain.models import zoo

        if backbones_only:
            return zoo.backbone_table(registry.BACKBONES.names())
        return zoo.table(registry.MODELS.names())
    lines = []
    for kind, reg in registry.all_registries().items():
        if (models_only and kind != "models") or (backbones_only and kind != "backbones"):
            continue
        lines.append(f"{kind}:")
        for name in reg.names():
            doc, args = reg.describe(name)
            lines.append(f"  {name}{args}")
            if doc:
                lines.append(f"      {doc}")
        lines.append("")
    return "\n".join(lines)


def define_flags(fv):
    flags.DEFINE_bool("models", False, "Only the models.", flag_values=fv)
    flags.DEFINE_bool("backbones", False, "Only the backbones.", flag_values=fv)
    flags.DEFINE_bool("details", False, "With --models: a markdown table of parameters, GFLOPs at 512x512 with 21 "
                      "classes, output stride and source (builds every model; takes a minute). With --backbones: "
                      "parameters, GFLOPs at 512x512, stages, preprocessing, ImageNet weights and source.",
                      flag_values=fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain list` from its parsed flags."""
    if fv.details and fv.models == fv.backbones:
        raise SegtrainError("--details needs one of --models or --backbones.")
    print(text(models_only=fv.models, details=fv.details, backbones_only=fv.backbones))
    return 0
