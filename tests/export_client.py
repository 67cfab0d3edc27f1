"""Calls exported SavedModels the way a server does, in a process that never imported segtrain.

    python tests/export_client.py INPUTS.npz RESULTS.npz SAVED_MODEL [SAVED_MODEL ...]

INPUTS.npz holds uint8 image batches [B,H,W,3]. For the k-th SavedModel, RESULTS.npz gets
``{k}/images/{key}/{output}`` from `serving_default` on each batch, ``{k}/bytes/{key}/{output}``
from `serving_bytes` on the same batch encoded as PNG, ``{k}/signatures`` (their names),
``{k}/inputs/{signature}`` (input name, dtype and shape) and ``{k}/mixed_sizes_error`` (what
`serving_bytes` says to a request of images of two sizes).
"""

import sys

import numpy as np
import tensorflow as tf


def main(inputs_path: str, results_path: str, saved_models: list[str]) -> None:
    inputs = dict(np.load(inputs_path))
    results = {}
    for k, path in enumerate(saved_models):
        loaded = tf.saved_model.load(path)
        images_fn, bytes_fn = loaded.signatures["serving_default"], loaded.signatures["serving_bytes"]
        results[f"{k}/signatures"] = np.array(sorted(loaded.signatures.keys()))
        for name, fn in (("serving_default", images_fn), ("serving_bytes", bytes_fn)):
            (spec,) = fn.structured_input_signature[1].values()
            results[f"{k}/inputs/{name}"] = np.array([spec.name, spec.dtype.name, str(spec.shape.as_list())])
        for key, batch in inputs.items():
            for output, value in images_fn(images=tf.constant(batch)).items():
                results[f"{k}/images/{key}/{output}"] = value.numpy()
            encoded = tf.stack([tf.io.encode_png(image) for image in batch])
            for output, value in bytes_fn(image_bytes=encoded).items():
                results[f"{k}/bytes/{key}/{output}"] = value.numpy()
        first, second = (tf.io.encode_png(batch[0]) for batch in list(inputs.values())[:2])
        try:
            bytes_fn(image_bytes=tf.stack([first, second]))
            results[f"{k}/mixed_sizes_error"] = np.array("")
        except tf.errors.InvalidArgumentError as e:
            results[f"{k}/mixed_sizes_error"] = np.array(e.message)
    np.savez(results_path, **results)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
