"""Facts about registered models and backbones for the tables of docs/pages/models.md:
``segtrain list --models --details`` and ``segtrain list --backbones --details``.

Parameters and forward GFLOPs are measured on the model built at 512x512 with 21 classes (Pascal
VOC), with the defaults of its registered function; GFLOPs are TensorFlow's profiler count (a
multiply-add is 2 FLOPs). The output stride is the one the model declares (a test checks it against
the coarsest feature map). The source is the ``Source:`` line of the model's docstring.
"""

from __future__ import annotations

import inspect
import math

SIZE, CLASSES = 512, 21
HEADER = "| model | parameters | GFLOPs at 512x512 | output stride | source |\n|---|---:|---:|---:|---|"


def forward_flops(model, size: int) -> float:
    """Forward FLOPs of one size x size image, counted by TensorFlow's profiler on the graph."""
    import tensorflow as tf

    spec = tf.TensorSpec([1, size, size, 3], tf.float32)
    graph = tf.function(lambda x: model(x, training=False)).get_concrete_function(spec).graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    return float(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)


def source(name: str) -> str:
    from registry import MODELS

    for line in (inspect.getdoc(MODELS.original(name)) or "").splitlines():
        if line.strip().startswith("Source:"):
            return line.split(":", 1)[1].strip()
    return ""


def measured_output_stride(model, size: int = SIZE) -> int:
    """Input size over the smallest feature map (global pooling aside), as a power of two."""
    smallest = size
    for layer in model.layers:
        for sub in getattr(layer, "layers", [layer]):  # look inside a nested backbone
            shape = getattr(sub, "output", None)
            shape = getattr(shape, "shape", None)
            if shape is not None and len(shape) == 4 and shape[1] and shape[1] > 1:
                smallest = min(smallest, shape[1])
    return 2 ** round(math.log2(size / smallest))


def details(name: str, flops: bool = True) -> dict:
    """{'model', 'parameters', 'gflops', 'output_stride', 'source'} of a registered model."""
    from registry import MODELS
    from segtrain.models.model import facts

    model = MODELS.get(name)(num_classes=CLASSES, input_shape=(SIZE, SIZE, 3))
    return {
        "model": name,
        "parameters": model.count_params(),
        "gflops": forward_flops(model, SIZE) / 1e9 if flops else None,
        "output_stride": facts(model).output_stride or measured_output_stride(model),
        "source": source(name),
    }


def row(d: dict) -> str:
    gflops = "" if d["gflops"] is None else f"{d['gflops']:.1f}"
    return f"| `{d['model']}` | {d['parameters'] / 1e6:.2f} M | {gflops} | {d['output_stride']} | {d['source']} |"


def table(names, flops: bool = True) -> str:
    return "\n".join([HEADER] + [row(details(n, flops)) for n in names])


BACKBONE_HEADER = ("| backbone | parameters | GFLOPs at 512x512 | stages (strides) | preprocessing of its weights "
                   "| ImageNet weights | source |\n|---|---:|---:|---|---|---|---|")


def backbone_details(name: str, flops: bool = True) -> dict:
    """{'backbone', 'parameters', 'gflops', 'strides', 'preprocessing', 'imagenet', 'source'} of a
    registered backbone: the network up to its stride-32 stage, at 512x512."""
    from registry import BACKBONES
    from segtrain.models import pretrained

    backbone = BACKBONES.get(name)()
    strides = backbone.strides()
    network = backbone.network(strides[-1:], input_shape=(SIZE, SIZE, 3))
    return {
        "backbone": name,
        "parameters": network.count_params(),
        "gflops": forward_flops(network, SIZE) / 1e9 if flops else None,
        "strides": strides,
        "preprocessing": backbone.preprocessing,
        "imagenet": name in pretrained.IMAGENET,
        "source": backbone.source,
    }


def backbone_row(d: dict) -> str:
    gflops = "" if d["gflops"] is None else f"{d['gflops']:.1f}"
    return (f"| `{d['backbone']}` | {d['parameters'] / 1e6:.2f} M | {gflops} | {', '.join(map(str, d['strides']))} "
            f"| {d['preprocessing'] or ''} | {'yes' if d['imagenet'] else ''} | {d['source']} |")


def backbone_table(names, flops: bool = True) -> str:
    return "\n".join([BACKBONE_HEADER] + [backbone_row(backbone_details(n, flops)) for n in names])
