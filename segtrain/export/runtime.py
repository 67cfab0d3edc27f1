"""An export of any format, loaded into its own runtime: uint8 images in, NumPy outputs out.

    SavedModel  TensorFlow (tf.saved_model.load, the serving_default signature)
    TFLite      the LiteRT interpreter (ai-edge-litert; TensorFlow's own tf.lite.Interpreter
                while it exists), the flat buffer's serving_default signature
    ONNX        ONNX Runtime on the CPU

Every runtime is called the same way: ``exported(images)`` with uint8 [B, H, W, 3] of any size
returns the export's outputs by name at that size. A TFLite export has one input size: images
of another size are resized to it (bilinear) and its logits resized back, as a device would.
"""

from __future__ import annotations

import json
import os

import numpy as np

from segtrain.errors import SegtrainError
from segtrain.export.serving import METADATA_FILE

FORMATS = ("saved_model", "tflite", "onnx")
_FILES = {"tflite": "model.tflite", "onnx": "model.onnx"}
TFLITE_INSTALL = 'pip install "segtrain[tflite]"'
ONNX_INSTALL = 'pip install "segtrain[onnx]"'


def read_metadata(path: str) -> tuple[str, dict]:
    """(the export's directory, its segtrain_export.json) for an export directory or its model file.

    Raises:
      SegtrainError: no such path, or one that is not a segtrain export.
    """
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if not os.path.exists(path):
        raise SegtrainError(f"--export={path}: no such file or directory.")
    metadata_path = os.path.join(directory, METADATA_FILE)
    try:
        with open(metadata_path) as f:
            metadata = json.load(f)
    except FileNotFoundError:
        raise SegtrainError(f"--export={path}: not a segtrain export ({METADATA_FILE} is missing beside it); give "
                            f"a directory `segtrain export` wrote, or its model file.") from None
    except (OSError, ValueError) as e:
        raise SegtrainError(f"--export={path}: {metadata_path} cannot be read: {e}") from None
    return directory, metadata


def export_format(metadata: dict) -> str:
    """The export's format: 'saved_model', 'tflite' or 'onnx' (older exports said 'TF SavedModel')."""
    value = metadata.get("format", "saved_model")
    return "saved_model" if value == "TF SavedModel" else value


class Exported:
    """A loaded export. Call it on uint8 images [B, H, W, 3]; ``logits`` gives float32 [B, H, W, C].

    Attributes:
      path: the model file (or SavedModel directory) loaded.
      directory: the export's directory (segtrain_export.json, MODEL_CARD.md).
      metadata: segtrain_export.json.
      format: 'saved_model', 'tflite' or 'onnx'.
      image_size: (height, width) the model takes, or None for any size.
    """

    def __init__(self, path: str, directory: str, metadata: dict):
        self.path, self.directory, self.metadata = path, directory, metadata
        self.format = export_format(metadata)
        size = metadata.get("image_size")
        self.image_size = tuple(int(v) for v in size) if size else None
        self.num_classes = int(metadata["num_classes"])
        self.multilabel = bool(metadata.get("multilabel", False))
        self.channels = int(metadata.get("channels", 3))
        self.image_dtype = str(metadata.get("image_dtype", "uint8"))
        self._run = None

    @property
    def task(self):
        """What the export's outputs mean (segtrain.task.Task), at the threshold and temperature it was
        exported with."""
        from segtrain.task import Task

        return Task(self.num_classes, int(self.metadata.get("ignore_label", 255)), self.multilabel,
                    float(self.metadata.get("threshold", 0.5)), float(self.metadata.get("temperature", 1.0)))

    def describe(self) -> str:
        quantize = self.metadata.get("quantize")
        text = {"saved_model": "SavedModel", "tflite": "TFLite", "onnx": "ONNX"}[self.format]
        if self.format == "tflite":
            text += f" {quantize or 'float32'} at {self.image_size[0]}x{self.image_size[1]}"
        return f"{text} export {self.path}"

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """The export's outputs for uint8 ``images`` [B, H, W, 3], at their size."""
        images = np.asarray(images)
        if images.dtype != np.dtype(self.image_dtype) or images.ndim != 4 or images.shape[-1] != self.channels:
            raise ValueError(f"this export takes {self.image_dtype} [B, H, W, {self.channels}] images, not "
                             f"{images.dtype} {list(images.shape)}")
        if self._run is None:
            self._run = _LOADERS[self.format](self)
        height, width = images.shape[1:3]
        if self.image_size is None or (height, width) == self.image_size:
            return self._run(images)
        outputs = self._run(resize_images(images, self.image_size))
        return _resized_back(outputs, (height, width), self.task)

    def logits(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(self(images)["logits"], np.float32)


def load(path: str) -> Exported:
    """The export at ``path`` (its directory, or its model file), ready to call.

    Raises:
      SegtrainError: not an export, or its runtime is not installed (naming the install line).
    """
    directory, metadata = read_metadata(path)
    form = export_format(metadata)
    if form not in FORMATS:
        raise SegtrainError(f"--export={path}: unknown format '{form}' in {METADATA_FILE}.")
    model_path = directory if form == "saved_model" else os.path.join(directory, metadata.get("model_file",
                                                                                             _FILES[form]))
    if not os.path.exists(model_path):
        raise SegtrainError(f"--export={path}: the model file {model_path} is missing.")
    exported = Exported(model_path, directory, metadata)
    exported._run = _LOADERS[form](exported)  # load now: a missing runtime is said before any work
    return exported


def resize_images(images: np.ndarray, size) -> np.ndarray:
    """uint8 (or uint16) images resized (bilinear) to ``size``, rounded back to their type."""
    import tensorflow as tf

    resized = tf.image.resize(tf.cast(images, tf.float32), size, method="bilinear")
    return np.clip(np.round(resized.numpy()), 0, np.iinfo(images.dtype).max).astype(images.dtype)


def _resized_back(outputs: dict, size, task) -> dict:
    """A fixed-size model's outputs at the images' own size: scores resized (bilinear), labels
    predicted from the resized logits as the model predicts them (segtrain.task)."""
    import tensorflow as tf

    out = {}
    for name in ("logits", "probabilities"):
        if name in outputs:
            out[name] = tf.image.resize(outputs[name], size, method="bilinear").numpy()
    out["labels"] = (task.predict(out["logits"]) if "logits" in out else
                     task.from_probabilities(out["probabilities"])).numpy().astype(np.int32)
    return out


def _saved_model(exported: Exported):
    import tensorflow as tf

    signature = tf.saved_model.load(exported.path).signatures["serving_default"]
    return lambda images: {k: v.numpy() for k, v in signature(images=tf.constant(images)).items()}


def interpreter_class():
    """LiteRT's Interpreter; TensorFlow's deprecated tf.lite.Interpreter where ai-edge-litert is missing."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = getattr(getattr(tf, "lite", None), "Interpreter", None)
        if Interpreter is None:
            raise SegtrainError(f"Running a TFLite export needs the LiteRT interpreter: {TFLITE_INSTALL}") from None
    return Interpreter


def _tflite(exported: Exported):
    interpreter = interpreter_class()(model_path=exported.path, num_threads=os.cpu_count())
    runner = interpreter.get_signature_runner("serving_default")
    return lambda images: {k: np.asarray(v) for k, v in runner(images=images).items()}


def _onnx(exported: Exported):
    try:
        import onnxruntime
    except ImportError:
        raise SegtrainError(f"Running an ONNX export needs ONNX Runtime: {ONNX_INSTALL}") from None
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    session = onnxruntime.InferenceSession(exported.path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda images: dict(zip(names, session.run(names, {"images": images})))


_LOADERS = {"saved_model": _saved_model, "tflite": _tflite, "onnx": _onnx}
