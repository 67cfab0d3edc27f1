"""segtrain: train semantic-segmentation models with TensorFlow, from one GPU to a cluster."""

__version__ = "0.1.0"


def load_builtin_plugins() -> None:
    """Imports the built-in models, losses, metrics and datasets so they are registered."""
    from segtrain import data, losses, metrics, models  # noqa: F401
