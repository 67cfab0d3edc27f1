"""MLflow and Weights & Biases beside TensorBoard: one action each, on the chief only.

``train.trackers = ('mlflow', 'wandb')`` adds them after the image panels. Each one logs

- the run's parameters: the operative gin bindings, named as the HParams dashboard names them
  (segtrain.train.hparams.flatten_bindings), at the start;
- the training scalars (``train/loss``, ``train/learning_rate``...) of every window, and each
  evaluation's scalars and per-class values (``eval/mean_iou``, ``eval/per_class_iou/<class>``),
  at the step TensorBoard has them;
- at each evaluation, the confusion picture and the image panels as images;
- at the end, the final evaluation's metrics as the run's summary (``final/<metric>``).

The tracked run's id is kept in model_dir/trackers.json, so a resumed run (a preempted job
restarted, more steps) goes on logging into the same tracked run. Steps logged before the
resume's checkpoint are logged again for the steps trained again: MLflow keeps both values of
such a step, W&B the first (its steps only go forward).

Settings (gin): ``trackers.mlflow.tracking_uri`` (default: MLflow's own, MLFLOW_TRACKING_URI),
``trackers.mlflow.experiment``; ``trackers.wandb.project``, ``.entity``, ``.mode`` ('online',
'offline'; default: WANDB_MODE, else online). Install with ``pip install 'segtrain[mlflow]'`` or
``'segtrain[wandb]'``.
"""

from __future__ import annotations

import io
import os
from typing import Sequence

import gin
import numpy as np

from segtrain.errors import SegtrainError, warn
from segtrain.io import read_json, write_json
from segtrain.train.hparams import flatten_bindings
from segtrain.train.loop import Action, Window

RECORD = "trackers.json"  # in model_dir: {tracker: run id}
TRACKERS = ("mlflow", "wandb")


def scalars(values: dict, prefix: str, class_names: Sequence[str] = ()) -> dict[str, float]:
    """Flat {name: number} of a results dict: per-class lists become name/<class>."""
    out = {}
    for key, value in values.items():
        if isinstance(value, (list, tuple, np.ndarray)) and key.startswith("per_class"):
            for i, v in enumerate(value):
                if v is not None and np.isfinite(v):
                    name = class_names[i] if i < len(class_names) else str(i)
                    out[f"{prefix}/{key}/{_safe(name)}"] = float(v)
        elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
            if np.isfinite(value):
                out[f"{prefix}/{key}"] = float(value)
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in str(name))


class Tracker(Action):
    """What both trackers share: the run id record, the parameters, what a window logs.

    Args:
      model_dir: the run's directory (its name is the tracked run's name).
      class_names: the dataset's classes, to name per-class values.
    """

    name = ""

    def __init__(self, model_dir: str, class_names: Sequence[str]):
        self.model_dir, self.class_names = model_dir, list(class_names)
        self.ended = False
        self.last: dict = {}

    # -- the record of run ids -------------------------------------------------------------
    def recorded_id(self) -> str | None:
        path = os.path.join(self.model_dir, RECORD)
        return read_json(path).get(self.name) if os.path.exists(path) else None

    def record_id(self, run_id: str) -> None:
        path = os.path.join(self.model_dir, RECORD)
        record = read_json(path) if os.path.exists(path) else {}
        write_json(path, {**record, self.name: run_id})

    # -- the action ------------------------------------------------------------------------
    def start(self, step: int) -> None:
        self.open(flatten_bindings(gin.operative_config_str()), step)

    def __call__(self, window: Window) -> None:
        values = scalars(window.scalars, "train")
        images = {}
        if window.eval is not None:
            results, cm = window.eval
            self.last = results
            values.update(scalars(results, "eval", self.class_names))
            images["confusion_matrix"] = [confusion_png(cm, self.class_names)]
        for tag, pictures in window.images.items():
            images[tag] = [png(p) for p in pictures]
        self.log(values, images, window.step)

    def end(self, step: int) -> None:
        self.finish({k.replace("eval/", "final/", 1): v for k, v in scalars(self.last, "eval",
                                                                               self.class_names).items()}, ok=True)
        self.ended = True

    def close(self) -> None:
        if not self.ended:
            self.finish({}, ok=False)

    # -- what each tracker does ------------------------------------------------------------
    def open(self, params: dict, step: int) -> None:
        raise NotImplementedError

    def log(self, values: dict[str, float], images: dict[str, list[bytes]], step: int) -> None:
        raise NotImplementedError

    def finish(self, summary: dict[str, float], ok: bool) -> None:
        raise NotImplementedError


@gin.configurable("trackers.mlflow", denylist=["model_dir", "class_names"])
class MLflow(Tracker):
    """Logs to an MLflow tracking server or store (``tracking_uri``), experiment ``experiment``."""

    name = "mlflow"

    def __init__(self, model_dir: str, class_names: Sequence[str], tracking_uri: str | None = None,
                 experiment: str = "segtrain"):
        super().__init__(model_dir, class_names)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise SegtrainError("train.trackers names 'mlflow', which needs MLflow: pip install "
                                "'segtrain[mlflow]'.") from None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.run_id: str | None = None

    def open(self, params: dict, step: int) -> None:
        from mlflow.entities import Param

        client = self.client
        run_id = self.recorded_id()
        if run_id is not None:
            try:
                client.get_run(run_id)
            except Exception:  # noqa: BLE001 (the store forgot it: a new tracked run)
                warn(f"MLflow has no run {run_id} (model_dir/{RECORD}): starting a new tracked run.")
                run_id = None
        if run_id is None:
            found = client.get_experiment_by_name(self.experiment)
            experiment_id = found.experiment_id if found else client.create_experiment(self.experiment)
            run = client.create_run(experiment_id, run_name=os.path.basename(os.path.abspath(self.model_dir)),
                                    tags={"segtrain.model_dir": os.path.abspath(self.model_dir)})
            run_id = run.info.run_id
            self.record_id(run_id)
            logged = {}
        else:
            client.update_run(run_id, status="RUNNING")
            logged = client.get_run(run_id).data.params
        self.run_id = run_id
        new = [Param(k[:250], str(v)[:6000]) for k, v in params.items() if k[:250] not in logged]
        for i in range(0, len(new), 100):
            client.log_batch(run_id, params=new[i:i + 100])
        changed = {f"resumed_at_step_{step}/{k}"[:250]: str(v)[:5000] for k, v in params.items()
                   if k[:250] in logged and logged[k[:250]] != str(v)[:6000]}
        for key, value in changed.items():  # a parameter cannot change: the new value is a tag
            client.set_tag(run_id, key, value)
        print(f"MLflow: run {run_id} of experiment '{self.experiment}' ({client.tracking_uri}).", flush=True)

    def log(self, values, images, step) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
        for tag, pictures in images.items():
            for i, data in enumerate(pictures):
                suffix = f"_{i}" if len(pictures) > 1 else ""
                self.client.log_image(self.run_id, _pil(data), f"{tag}/step_{step:07d}{suffix}.png")

    def finish(self, summary, ok) -> None:
        if self.run_id is None:
            return
        if summary:
            self.log(summary, {}, 0)
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "KILLED")


@gin.configurable("trackers.wandb", denylist=["model_dir", "class_names"])
class Wandb(Tracker):
    """Logs to Weights & Biases (``project``, ``entity``; ``mode`` 'offline' writes under model_dir/wandb)."""

    name = "wandb"

    def __init__(self, model_dir: str, class_names: Sequence[str], project: str = "segtrain",
                 entity: str | None = None, mode: str | None = None):
        super().__init__(model_dir, class_names)
        try:
            import wandb
        except ImportError:
            raise SegtrainError("train.trackers names 'wandb', which needs Weights & Biases: pip install "
                                "'segtrain[wandb]'.") from None
        self.wandb = wandb
        self.project, self.entity, self.mode = project, entity, mode
        self.run = None

    def open(self, params: dict, step: int) -> None:
        run_id = self.recorded_id()
        if run_id is None:
            import secrets
            import string

            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            self.record_id(run_id)
        self.run = self.wandb.init(project=self.project, entity=self.entity, mode=self.mode, id=run_id,
                                   resume="allow", dir=os.path.abspath(self.model_dir), config=params,
                                   name=os.path.basename(os.path.abspath(self.model_dir)),
                                   settings=self.wandb.Settings(silent=True, console="off"),
                                   allow_val_change=True)
        print(f"W&B: run {run_id} of project '{self.project}' ({self.run.settings.mode}).", flush=True)

    def log(self, values, images, step) -> None:
        data = dict(values)
        for tag, pictures in images.items():
            data[tag] = [self.wandb.Image(_pil(p)) for p in pictures]
        self.run.log(data, step=step)

    def finish(self, summary, ok) -> None:
        if self.run is None:
            return
        self.run.summary.update(summary)
        self.run.finish(exit_code=0 if ok else 1)
        self.run = None


def build(names: Sequence[str], model_dir: str, class_names: Sequence[str]) -> list[Tracker]:
    """The tracker actions ``train.trackers`` names.

    Raises:
      SegtrainError: an unknown tracker, or one whose package is missing.
    """
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise SegtrainError(f"train.trackers names {', '.join(map(repr, unknown))}: the trackers are "
                            f"{', '.join(map(repr, TRACKERS))}.")
    makers = {"mlflow": MLflow, "wandb": Wandb}
    return [makers[n](model_dir, class_names) for n in dict.fromkeys(names)]


def png(pixels: np.ndarray) -> bytes:
    from segtrain.images import encode

    return encode(np.asarray(pixels, np.uint8))


def _pil(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def confusion_png(cm: np.ndarray, class_names: Sequence[str]) -> bytes:
    """The labelled confusion picture (segtrain[plots]), else the plain one TensorBoard shows."""
    from segtrain import plots
    from segtrain.train.summaries import confusion_image

    if plots.have_matplotlib():
        return plots.confusion_matrix_png(cm, class_names)
    return png(confusion_image(np.asarray(cm)))
