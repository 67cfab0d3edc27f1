"""Model plugins: ``fn(num_classes, **config) -> keras.Model`` producing logits at input size."""

from segtrain.models import deeplab, encoder_decoder, fcn, unet, xception  # noqa: F401  (registers the models)
