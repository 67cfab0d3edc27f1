"""`segtrain list`: every registered plugin with its one-line doc and its arguments."""

from __future__ import annotations

from absl import flags

import registry


def text(models_only: bool = False, details: bool = False) -> str:
    """The listing; ``details``: the model table of docs/pages/models.md instead (builds every model)."""
    registry.load_all()
    if details:
        from segtrain.models import zoo

        return zoo.table(registry.MODELS.names())
    lines = []
    for kind, reg in registry.all_registries().items():
        if models_only and kind != "models":
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
    flags.DEFINE_bool("details", False, "With --models: a markdown table of parameters, GFLOPs at 512x512 with 21 "
                      "classes, output stride and source (builds every model; takes a minute).", flag_values=fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain list` from its parsed flags."""
    print(text(models_only=fv.models, details=fv.details))
    return 0
