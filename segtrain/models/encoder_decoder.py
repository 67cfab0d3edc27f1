"""The plain encoder-decoder of the Oxford-IIIT Pet segmentation example (Chollet, Deep Learning with
Python, 2nd ed., 2021)."""

from __future__ import annotations

import keras

from registry import MODELS
from segtrain.models.layers import check_divisible, classifier, image_input
from segtrain.models.model import SegmentationModel


@MODELS.register("encoder_decoder")
def encoder_decoder(num_classes: int, input_shape=None) -> keras.Model:
    """Three stride-2 conv stages down, three Conv2DTranspose stages up, 3x3 classifier.

    No skips and no batch norm: the simplest model that segments. The source model starts
    with Rescaling(1/255) and ends with a softmax; here the input pipeline normalises and the
    model returns logits (2,880,643 parameters for 3 classes, as in the book).

    Source: Chollet, Deep Learning with Python (2nd ed., 2021), Oxford-IIIT Pet example.

    Args:
      num_classes: output channels (logits).
      input_shape: (H, W, 3) to fix the input size, or None; H and W must be divisible by 8.
    """
    check_divisible(input_shape, 8, "encoder_decoder")
    inputs = image_input(input_shape)
    x = inputs
    for i, filters in enumerate((64, 128, 256)):
        x = keras.layers.Conv2D(filters, 3, strides=2, padding="same", activation="relu", name=f"encoder.stage{i}.down")(x)
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"encoder.stage{i}.conv")(x)
    for i, filters in enumerate((256, 128, 64)):
        x = keras.layers.Conv2DTranspose(filters, 3, padding="same", activation="relu", name=f"decoder.stage{i}.conv")(x)
        x = keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation="relu", name=f"decoder.stage{i}.up")(x)
    return SegmentationModel(inputs, classifier(x, num_classes, kernel_size=3), name="encoder_decoder",
                             size_divisor=8, output_stride=8, cam_layer="encoder.stage2.conv")
