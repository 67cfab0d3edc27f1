"""segtrain: train semantic-segmentation models with TensorFlow, from one GPU to a cluster."""

__version__ = "0.1.0"
