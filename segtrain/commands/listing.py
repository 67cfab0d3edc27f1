"""`segtrain list`: every registered plugin with its one-line doc and its arguments."""

from __future__ import annotations

import registry


def text(models_only: bool = False, details: bool = False) -> str:
    """The listing; ``details``: the README's model table instead (builds every model)."""
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
