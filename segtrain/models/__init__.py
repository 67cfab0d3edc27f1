"""Model plugins: ``fn(num_classes, **config) -> keras.Model`` producing logits at input size."""

from segtrain.models import encoder_decoder, unet  # noqa: F401  (registers the models)
