"""Post-processor plugins: host-side NumPy steps applied to one image's predicted probabilities.

Contract. A registered factory ``fn(**config) -> Postprocessor`` (gin: ``postprocessors.<name>.*``)
builds a ``Postprocessor``; calling it as ``postprocessor(image, probabilities)`` with

- ``image``: uint8 [H, W, 3], the RGB image as read (not normalised),
- ``probabilities``: float32 [H, W, C], the model's softmax at the image's size,

returns a dict with

- ``'probabilities'``: float32 [H, W, C], refined probabilities whose rows sum to 1 (a
  *refiner*: its argmax replaces the model's mask, so `segtrain evaluate` can score it), and/or
- ``'instances'``: ``{class index: int32 [H, W]}`` instance ids per class, 0 for no instance
  (an *instance maker*: there is no refined mask to score; `segtrain predict` writes them).

``Postprocessor.refines`` / ``.makes_instances`` say which keys it returns, so a command can
refuse a post-processor it has no use for (``build(name, need='probabilities')``). One image
at a time, on the host: these steps are iterative, irregular algorithms with no TF kernels.

Built in: ``dense_crf`` (a refiner; ``pip install 'segtrain[crf]'``) and
``watershed_instances`` (an instance maker; ``pip install 'segtrain[instances]'``). Their
libraries are imported when a post-processor is built, so importing this module needs neither.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Sequence

import numpy as np
from scipy import ndimage

from registry import POSTPROCESSORS
from segtrain.errors import SegtrainError

OUTPUTS = ("probabilities", "instances")


@dataclasses.dataclass(frozen=True)
class Postprocessor:
    """A built post-processor: ``postprocessor(image, probabilities) -> dict`` (see the module doc).

    Attributes:
      name: its registry name, for messages.
      fn: the step itself, called with checked arrays.
      refines: returns 'probabilities' (refined probabilities [H, W, C]).
      makes_instances: returns 'instances' ({class index: int32 [H, W] instance ids}).
    """

    name: str
    fn: Callable[[np.ndarray, np.ndarray], dict]
    refines: bool = False
    makes_instances: bool = False

    def __call__(self, image: np.ndarray, probabilities: np.ndarray) -> dict:
        image, probabilities = np.asarray(image), np.asarray(probabilities)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{self.name}: image must be uint8 [H, W, 3], got {image.dtype} {image.shape}")
        if probabilities.ndim != 3 or probabilities.shape[:2] != image.shape[:2]:
            raise ValueError(f"{self.name}: probabilities must be [H, W, C] at the image's size "
                             f"{image.shape[:2]}, got {probabilities.shape}")
        return self.fn(image, probabilities.astype(np.float32, copy=False))


def build(name: str, need: str | None = None) -> Postprocessor:
    """The post-processor registered as ``name``, configured by gin (``postprocessors.<name>.*``).

    Args:
      name: the registry name (``--postprocess=NAME``).
      need: 'probabilities' or 'instances': the output the caller uses; a post-processor that
        does not give it is refused.

    Raises:
      RegistryError: an unknown name. SegtrainError: the post-processor does not give ``need``,
        or its optional libraries are missing.
    """
    if need not in (None, *OUTPUTS):
        raise ValueError(f"need must be one of {OUTPUTS}, got {need!r}")
    postprocessor = POSTPROCESSORS.get(name)()
    if need == "probabilities" and not postprocessor.refines:
        raise SegtrainError(f"--postprocess={name}: {name} makes instances, not a refined mask: use it with "
                            f"`segtrain predict`.")
    if need == "instances" and not postprocessor.makes_instances:
        raise SegtrainError(f"--postprocess={name}: {name} refines the mask and makes no instances.")
    return postprocessor


def _import_extra(module: str, extra: str, plugin: str, package: str):
    """Imports an optional library, or says how to install the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise SegtrainError(
            f"The {plugin} post-processor needs {package}, which is not installed ({e}): "
            f"pip install 'segtrain[{extra}]'"
        ) from None


def _check(plugin: str, arg: str, value, minimum: float, integer: bool = False, above: bool = False) -> None:
    """SegtrainError naming ``postprocessors.<plugin>.<arg>`` unless value >= minimum (> if above)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or (integer and int(value) != value) or value < minimum or (above and value == minimum):
        what = f"{'an integer' if integer else 'a number'} {'>' if above else '>='} {minimum}"
        raise SegtrainError(f"postprocessors.{plugin}.{arg} must be {what}, got {value!r}.")


@POSTPROCESSORS.register("dense_crf")
def dense_crf(
    iterations: int = 10,
    gaussian_sxy: float = 1.0,
    gaussian_compat: float = 3.0,
    bilateral_sxy: float = 67.0,
    bilateral_srgb: float = 3.0,
    bilateral_compat: float = 4.0,
) -> Postprocessor:
    """Fully connected CRF (Krähenbühl & Koltun, 2011) on the softmax: sharper, image-aligned edges.

    Mean-field inference with a smoothness kernel (Gaussian over position) and an appearance
    kernel (bilateral: position and colour), through pydensecrf2. The defaults are DeepLab v2's
    on Pascal VOC; the kernel widths are in pixels and RGB levels, so images much larger or
    smaller than VOC's (~500 px) want other widths.

    Args:
      iterations: mean-field iterations.
      gaussian_sxy, gaussian_compat: the smoothness kernel's width (pixels) and weight.
      bilateral_sxy, bilateral_srgb, bilateral_compat: the appearance kernel's spatial width
        (pixels), colour width (RGB levels) and weight.

    Raises:
      SegtrainError: pydensecrf2 is missing (``pip install 'segtrain[crf]'``), or a bad setting.
    """
    _check("dense_crf", "iterations", iterations, 1, integer=True)
    for arg, width in (("gaussian_sxy", gaussian_sxy), ("bilateral_sxy", bilateral_sxy),
                       ("bilateral_srgb", bilateral_srgb)):
        _check("dense_crf", arg, width, 0, above=True)
    for arg, weight in (("gaussian_compat", gaussian_compat), ("bilateral_compat", bilateral_compat)):
        _check("dense_crf", arg, weight, 0)
    dcrf = _import_extra("pydensecrf.densecrf", "crf", "dense_crf", "pydensecrf2")
    utils = _import_extra("pydensecrf.utils", "crf", "dense_crf", "pydensecrf2")

    def refine(image: np.ndarray, probabilities: np.ndarray) -> dict:
        h, w, c = probabilities.shape
        crf = dcrf.DenseCRF2D(w, h, c)
        # pydensecrf wants C-contiguous float32 unaries [C, H*W] and a C-contiguous uint8 image.
        unary = utils.unary_from_softmax(np.ascontiguousarray(probabilities.transpose(2, 0, 1)))
        crf.setUnaryEnergy(np.ascontiguousarray(unary, np.float32))
        crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
        crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image),
                                 compat=bilateral_compat)
        q = np.asarray(crf.inference(int(iterations)), np.float32).reshape(c, h, w).transpose(1, 2, 0)
        return {"probabilities": np.ascontiguousarray(q / q.sum(-1, keepdims=True))}

    return Postprocessor("dense_crf", refine, refines=True)


@POSTPROCESSORS.register("watershed_instances")
def watershed_instances(
    classes: Sequence[int] | None = None,
    background: int | None = 0,
    min_distance: int = 5,
    exclude_border: bool = False,
    min_size: int = 20,
) -> Postprocessor:
    """Instances from the semantic mask: each class's region split at its necks by a watershed.

    For every chosen class, the pixels predicted as that class (the argmax) are cut into
    instances by a watershed of their negated distance transform, seeded at its local maxima
    (the centres of round objects): touching blobs become one instance each.

    Args:
      classes: the class indices to split into instances (None: every class but ``background``).
      background: the class with no instances (None: none is background).
      min_distance: least distance in pixels between two seeds; about the smallest object radius.
      exclude_border: ignore seeds within ``min_distance`` of the image border.
      min_size: instances smaller than this many pixels are dropped (set to 0).

    Raises:
      SegtrainError: scikit-image is missing (``pip install 'segtrain[instances]'``), or a bad setting.
    """
    _check("watershed_instances", "min_distance", min_distance, 1, integer=True)
    _check("watershed_instances", "min_size", min_size, 0, integer=True)
    if classes is not None and (isinstance(classes, (str, int)) or not all(
            isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in classes)):
        raise SegtrainError(f"postprocessors.watershed_instances.classes must be None or a list of class "
                            f"indices, got {classes!r}.")
    feature = _import_extra("skimage.feature", "instances", "watershed_instances", "scikit-image")
    segmentation = _import_extra("skimage.segmentation", "instances", "watershed_instances", "scikit-image")

    def split_class(mask: np.ndarray) -> np.ndarray:
        """int32 instance ids of one class's mask."""
        if not mask.any():
            return np.zeros(mask.shape, np.int32)
        distance = ndimage.distance_transform_edt(mask)
        regions, _ = ndimage.label(mask)
        peaks = feature.peak_local_max(distance, min_distance=int(min_distance), labels=regions,
                                       exclude_border=bool(exclude_border))
        seeds = np.zeros(mask.shape, bool)
        seeds[tuple(peaks.T)] = True
        markers, count = ndimage.label(seeds, structure=np.ones((3, 3)))  # a plateau is one seed
        # A region with no seed (too close to the border, say) is one instance of its own.
        # (4-connected, as the regions and the watershed are.)
        unseeded = mask & ~ndimage.binary_propagation(seeds, mask=mask)
        rest, _ = ndimage.label(unseeded)
        markers[rest > 0] = rest[rest > 0] + count
        instances = segmentation.watershed(-distance, markers, mask=mask)
        if min_size:
            sizes = np.bincount(instances.ravel())
            instances[sizes[instances] < min_size] = 0
        return segmentation.relabel_sequential(instances)[0].astype(np.int32)

    def make(image: np.ndarray, probabilities: np.ndarray) -> dict:
        num_classes = probabilities.shape[-1]
        chosen = list(classes) if classes is not None else [c for c in range(num_classes) if c != background]
        unknown = [c for c in chosen if c >= num_classes]
        if unknown:
            raise SegtrainError(f"postprocessors.watershed_instances.classes names class(es) {unknown}, "
                                f"but the model predicts {num_classes} classes (0..{num_classes - 1}).")
        predicted = probabilities.argmax(-1)
        return {"instances": {c: split_class(predicted == c) for c in chosen}}

    return Postprocessor("watershed_instances", make, makes_instances=True)
