"""Model plugins: ``fn(num_classes, **config) -> keras.Model`` producing logits at input size.

Importing this package registers the built-in models and backbones.
"""

from segtrain.models import backbones, deeplab, encoder_decoder, fcn, segformer, unet, xception  # noqa: F401  (registers)
from segtrain.models.model import ModelFacts, SegmentationModel, facts, leaf_layers, synchronize_batch_norm

__all__ = ["ModelFacts", "SegmentationModel", "facts", "leaf_layers", "synchronize_batch_norm"]
