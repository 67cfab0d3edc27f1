"""Training: an Experiment plus an optimizer, a step counter, checkpoints and a compiled window.

``train(model_dir)`` trains the experiment configured in gin. ``Trainer`` holds what training
adds to the experiment; ``Trainer.fit`` resumes from the latest checkpoint, builds the actions
(segtrain.train.actions) and runs the loop (segtrain.train.loop).
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np
import tensorflow as tf

from segtrain import metrics
from segtrain import run_dir
from segtrain.errors import DATA_ERROR_MARKER, SegtrainError, data_errors, warn, xla_reason
from segtrain.experiment import Experiment, ExperimentConfig, restore_checkpoint
from segtrain.io import read_json
from segtrain.runtime.distribute import WriteDir, build_strategy, lost_peers, task_name
from segtrain.runtime.lock import run_lock
from segtrain.train import loop
from segtrain.train import replicas as replica_state
from segtrain.train import summaries
from segtrain.train import trackers
from segtrain.train.actions import (EarlyStopping, EvalSummaries, Evaluate, ImagePanels, KeepBest, OnNonFinite,
                                    ProgressLine, SaveCheckpoints, TrainSummaries, WriteConfig)
from segtrain.train.checkpoints import Checkpoints
from segtrain.train.hparams import HParams
from segtrain.train.optimizers import build_optimizer, current_learning_rate, loss_scale, loss_scaling
from segtrain.train.preemption import Preemption
from segtrain.train.profiler import Profiler
from segtrain.train.pruning import ReportToStudy, trial_from_environment


def train(model_dir: str, strategy: tf.distribute.Strategy | None = None,
          extra_actions: Sequence[loop.Action] = ()) -> dict:
    """Trains the experiment configured in gin; returns the last evaluation's results.

    Args:
      model_dir: the run's directory.
      strategy: the strategy to train under (default: ``distribute.*`` in gin, see
        segtrain.runtime.distribute.build_strategy).
      extra_actions: more actions, called after the built-in ones at every window end.

    Raises:
      SegtrainError: among others, another live job trains into ``model_dir`` (its lock,
        segtrain.runtime.lock, names it).
    """
    run_dir.require(model_dir)
    strategy = strategy or build_strategy()  # first: it may split the CPU before TF starts
    with run_lock(model_dir, strategy):  # one job at a time writes a run directory
        config = ExperimentConfig()
        trainer = Trainer(Experiment(config, strategy, split=config.train_split), model_dir)
        try:
            return trainer.fit(extra_actions)
        finally:
            trainer.write_dir.cleanup()


class Trainer:
    """What training adds to an experiment: optimizer, step, checkpoints, the compiled window.

    Args:
      experiment: the experiment; its model is built for its training split.
      model_dir: the run's directory.
    """

    def __init__(self, experiment: Experiment, model_dir: str):
        run_dir.require(model_dir)
        cfg = experiment.config
        if experiment.split != cfg.train_split:  # the classes come from the split trained on
            experiment = Experiment(cfg, experiment.strategy, split=cfg.train_split)
        self.experiment, self.config, self.model_dir = experiment, cfg, model_dir
        self.strategy = experiment.strategy
        self.model = experiment.model
        with self.strategy.scope():
            # train.on_nan = 'restore' lowers the learning rate through this factor.
            self.lr_factor = (tf.Variable(1.0, trainable=False, name="lr_factor",
                                          aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
                              if cfg.on_nan == "restore" else None)
            self.optimizer = build_optimizer(cfg.num_steps, cfg.precision, lr_factor=self.lr_factor, model=self.model)
            self.optimizer.build(self.model.trainable_variables)
            self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
        # Only the chief writes into model_dir; every worker restores from it.
        self.write_dir = WriteDir(model_dir, self.strategy)
        self.chief = self.write_dir.chief
        self.checkpoints = Checkpoints(model_dir, self.model, cfg.keep_checkpoints, write_dir=self.write_dir.path,
                                       on_damaged=cfg.on_damaged_checkpoint, optimizer=self.optimizer, step=self.step)
        replica_state.check_synchronized_xla(cfg.xla, cfg.synchronized_batch_norm, self.strategy)
        if cfg.xla and not tf.config.list_physical_devices("GPU"):
            warn("--xla without a GPU: XLA's speed-up is on GPUs. On a CPU it can be slower than "
                 "TensorFlow's own kernels, and the first step compiles for a while: compare with "
                 "benchmarks/bench_train.py before relying on it.")
        # Per-replica state (segtrain.train.replicas): what each replica updates on its own is
        # averaged at every window end; random-number state is made to differ per replica.
        replicated = self.strategy.num_replicas_in_sync > 1
        self._drifting = replica_state.drifting_variables(self.model) if replicated else []
        self._seed_states = replica_state.seed_states(self.model) if replicated else []
        self._decorrelated = False
        self._train_loop = tf.function(self._loop)
        # Under MirroredStrategy only the loss-and-gradient part compiles (apply_gradients on
        # mirrored variables does not), so that part is what XLA gets under every strategy.
        self._forward_backward = tf.function(self._loss_and_grads, jit_compile=True) if cfg.xla else self._loss_and_grads
        # pipeline.colour_on_device: the batch's colour jitter and normalisation, compiled too.
        self._finish_batch = (tf.function(experiment.finish_batch, jit_compile=True) if cfg.xla
                              else experiment.finish_batch)

    # ---- the compiled part -------------------------------------------------------------
    def _loss_and_grads(self, images, labels):
        task = self.experiment.task
        with tf.GradientTape() as tape:
            logits = self.model(images, training=True)
            per_example = self.experiment.loss_fn(labels, tf.cast(logits, tf.float32))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=self.config.batch_size)
            if self.model.losses:
                regularization = tf.add_n([tf.cast(x, tf.float32) for x in self.model.losses])
                # Each of the accumulation_steps micro-batches carries its share.
                loss += tf.nn.scale_regularization_loss(regularization) / self.config.accumulation_steps
            # float16: gradients of the scaled loss; apply_gradients unscales them and skips
            # (and halves the scale on) a step whose gradients are not finite.
            scaled = self.optimizer.scale_loss(loss) if loss_scaling(self.optimizer) else loss
        grads = tape.gradient(scaled, self.model.trainable_variables)
        cm = task.counts(labels, task.predict(logits))
        return loss, grads, cm

    def _replica_step(self, batch):
        if batch["image"].dtype.is_floating:  # finished by the pipeline: no (compiled) finish_batch call
            images, labels = batch["image"], batch["label"]
        else:
            images, labels = self._finish_batch(batch)
        if self.config.accumulation_steps > 1:
            loss, grads, cm = self._accumulate(images, labels)
        else:
            loss, grads, cm = self._forward_backward(images, labels)
        if loss_scaling(self.optimizer) and self.strategy.num_replicas_in_sync > 1:
            # An overflow on one replica skips the step on all of them (segtrain.train.replicas).
            grads = replica_state.finite_everywhere(grads)
        if self.config.clip_norm:
            # Clip the true gradient: unscale first, scale back after (powers of two: exact).
            scale = tf.cast(self.optimizer.dynamic_scale, tf.float32) if loss_scaling(self.optimizer) else None
            if scale is not None:
                grads = [None if g is None else g / scale for g in grads]
            grads = self._clip(grads)
            if scale is not None:
                grads = [None if g is None else g * scale for g in grads]
        self.optimizer.apply_gradients(zip(grads, self.model.trainable_variables))
        return loss, cm

    def _accumulate(self, images, labels):
        """The loss, gradient and confusion matrix of this replica's batch, summed over
        train.accumulation_steps micro-batches that each pass through ``_forward_backward``.

        Every micro-batch's loss is already its share of the global-batch mean, so the sums are
        what the whole batch gives at once. A tf.while_loop with parallel_iterations=1 runs one
        micro-batch at a time: running several together would hold several micro-batches'
        activations, the memory accumulation exists to save. Gradients of the loss scaled for
        float16 stay scaled; apply_gradients unscales their sum.

        Synchronised batch norm all-reduces inside the forward pass, which MirroredStrategy
        cannot do inside a tf.while_loop (its merge_call). Then the micro-batches are unrolled
        instead, each one starting after the previous one's gradients exist, so still one at a
        time.
        """
        k = self.config.accumulation_steps
        variables = self.model.trainable_variables

        def split(x):  # [k * m, ...] -> [k, m, ...], micro-batch i = examples i*m .. (i+1)*m - 1
            m = x.shape[0] // k if x.shape[0] is not None else -1
            return tf.reshape(x, tf.concat([[k, m], tf.shape(x)[1:]], 0))

        images, labels = split(images), split(labels)
        present: list[int] = []  # variables with a gradient, found when the body is traced

        def body(i, loss, cm, sums):
            micro_loss, grads, micro_cm = self._forward_backward(images[i], labels[i])
            present[:] = [j for j, g in enumerate(grads) if g is not None]
            # convert_to_tensor: a gather's gradient (IndexedSlices) becomes dense to be summed.
            sums = [s if g is None else s + tf.convert_to_tensor(g) for s, g in zip(sums, grads)]
            return i + 1, loss + micro_loss, cm + micro_cm, sums

        start = (tf.constant(0), tf.constant(0.0), tf.zeros(self.experiment.task.counts_shape, tf.int64),
                 [tf.zeros(v.shape, v.dtype) for v in variables])
        if self.config.synchronized_batch_norm:
            state = start
            for _ in range(k):
                with tf.control_dependencies(state[3]):  # after the previous micro-batch's gradients
                    state = body(*(tf.identity(x) if isinstance(x, tf.Tensor) else x for x in state))
            _, loss, cm, sums = state
        else:
            _, loss, cm, sums = tf.while_loop(lambda i, *_: i < k, body, start, parallel_iterations=1)
        return loss, [sums[j] if j in present else None for j in range(len(variables))], cm

    def _clip(self, grads):
        """Clips the norm of the gradient summed over replicas, not of each replica's part.

        Variables the loss does not reach have no gradient (None); they stay None.
        """
        present = [i for i, g in enumerate(grads) if g is not None]
        parts = [grads[i] for i in present]
        replicas = self.strategy.num_replicas_in_sync
        if replicas > 1:
            parts = tf.distribute.get_replica_context().all_reduce("SUM", parts)
        clipped, _ = tf.clip_by_global_norm(parts, self.config.clip_norm)
        if replicas > 1:
            # The optimizer sums over replicas again: hand it an equal share of the clipped sum.
            clipped = [g / replicas for g in clipped]
        grads = list(grads)
        for i, g in zip(present, clipped):
            grads[i] = g
        return grads

    def _loop(self, iterator, num_steps):
        losses = tf.TensorArray(tf.float32, size=num_steps)
        cm = tf.zeros(self.experiment.task.counts_shape, tf.int64)
        for i in tf.range(num_steps):
            loss, r_cm = self.strategy.run(self._replica_step, args=(next(iterator),))
            losses = losses.write(i, self.strategy.reduce("SUM", loss, axis=None))
            cm += self.strategy.reduce("SUM", r_cm, axis=None)
            self.step.assign_add(1)
        if self._drifting:  # one all-reduce per window: every replica ends it with equal state
            self.strategy.run(replica_state.average_over_replicas, args=(self._drifting,))
        return losses.stack(), cm

    def decorrelate_replicas(self) -> None:
        """Gives each replica its own random-number state (dropout masks, noise), once: Keras
        does not checkpoint SeedGenerator states, so a restore leaves them as they are (a new
        process starts them equal again, from the seed)."""
        if self._seed_states and not self._decorrelated:
            self._decorrelated = True

            def decorrelate():
                self.strategy.run(replica_state.decorrelate_seeds, args=(self._seed_states,))

            tf.function(decorrelate)()

    # ---- the host side -----------------------------------------------------------------
    def train_window(self, iterator, step: int, n: int, first: bool = False) -> loop.Window:
        """Trains ``n`` steps from ``step`` in one compiled call.

        The speed scalars are left out of the ``first`` window, which also traces (with XLA,
        compiles) the step.
        """
        t0 = time.perf_counter()
        losses, cm = self._run_loop(iterator, n, first)
        losses = losses.numpy()
        elapsed = time.perf_counter() - t0
        scalars = {"loss": float(np.mean(losses)), "learning_rate": current_learning_rate(self.optimizer),
                   **metrics.compute(cm.numpy(), ("pixel_accuracy", "mean_iou"))}
        if loss_scaling(self.optimizer):
            scalars["loss_scale"] = loss_scale(self.optimizer)
        images_per_s = self.config.batch_size * n / elapsed
        if not first:
            scalars.update(images_per_second=images_per_s, step_time_seconds=elapsed / n)
        return loop.Window(step + n, n, losses, scalars, images_per_s)

    def _run_loop(self, iterator, n: int, first: bool):
        """One call of the compiled loop; the first call's compile errors become one message."""
        try:
            return self._train_loop(iterator, tf.constant(n))
        except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError, tf.errors.InternalError) as e:
            if not (first and self.config.xla) or DATA_ERROR_MARKER in str(e):
                raise
            raise SegtrainError(
                f"XLA could not compile model '{self.config.model}' with loss '{self.config.loss}' at "
                f"precision {self.config.precision}: {xla_reason(e.message)}. Train without XLA (drop --xla, or "
                f"train.xla = False)."
            ) from None

    def iterator(self, seed: int):
        """The distributed training input, and its crops' (height, width).

        Each worker builds its own pipeline over its own shard of the examples.
        """
        specs = []

        def dataset_fn(context):
            ds = self.experiment.train_dataset(seed, context, run=self.model_dir)
            specs.append(ds.element_spec)
            return ds

        iterator = iter(self.strategy.distribute_datasets_from_function(dataset_fn))
        return iterator, tuple(specs[0]["image"].shape[1:3])

    def fit(self, extra_actions: Sequence[loop.Action] = ()) -> dict:
        """Trains to train.num_steps (or an early stop); returns the last evaluation's results."""
        # A lost cluster peer: one message naming it, and where the relaunched job resumes.
        with lost_peers(self.strategy, lambda: self.step.numpy(), lambda: self.checkpoints.latest_checkpoint):
            splits = (self.config.train_split, self.config.eval_split)
            with data_errors(lambda e: self.experiment.damaged_data(e, splits)):
                return self._fit(extra_actions)

    def _fit(self, extra_actions: Sequence[loop.Action]) -> dict:
        cfg, exp = self.config, self.experiment
        os.makedirs(self.model_dir, exist_ok=True)
        restored = self.checkpoints.restore_latest()
        self.decorrelate_replicas()
        start = int(self.step.numpy())
        if restored:
            print(f"Resuming {self.model_dir} from {os.path.basename(restored)} at step {start}")
            if self.chief:  # what was written after the checkpoint is written again: one value per step
                summaries.purge_after(os.path.join(self.model_dir, run_dir.TRAIN_LOGS), start, at_step=(WriteConfig.TAG,))
                summaries.purge_after(os.path.join(self.model_dir, run_dir.EVAL_LOGS), start)
        best = KeepBest(self.checkpoints, cfg.best_metric, cfg.mode, cfg.min_delta)
        early_stopping = EarlyStopping(best, cfg.early_stopping_patience)
        results_path = os.path.join(self.model_dir, run_dir.in_run_results(cfg.eval_split))
        if start >= cfg.num_steps and not early_stopping.stopped() and _unevaluated(results_path, start):
            return self._final_evaluation(start, results_path, best)
        if start >= cfg.num_steps or early_stopping.stopped():
            why = (f"stopped early at step {start} ({cfg.best_metric} did not improve for {best.stale} "
                   f"evaluations; raise train.early_stopping_patience, or set it to 0, to go on)"
                   if start < cfg.num_steps else f"is already at step {start} >= train.num_steps={cfg.num_steps}")
            print(f"{self.model_dir} {why}; nothing to train.")
            return read_json(results_path) if os.path.exists(results_path) else {}
        # A resumed run continues with fresh shuffling/augmentation draws instead of replaying
        # the first steps' data.
        iterator, crop_size = self.iterator(cfg.seed + start)
        self._check_output(crop_size)
        eval_ds = exp.eval_dataset(cfg.eval_split)
        # Summaries come from the chief alone; the other workers' would be duplicates.
        writers = {k: summaries.EventWriter(os.path.join(self.model_dir, k) if self.chief else None)
                   for k in (run_dir.TRAIN_LOGS, run_dir.EVAL_LOGS)}
        skipped = exp.info.damaged_records.get(cfg.train_split)
        if skipped:  # datasets.<name>.skip_damaged_records: what the run trains without
            summaries.write_scalars(writers[run_dir.TRAIN_LOGS], {"data/damaged_records_skipped": skipped}, start)
        actions = [*self.build_actions(writers, eval_ds, results_path, best, early_stopping), *extra_actions]
        window = lambda step, n: self.train_window(iterator, step, n, first=step == start)  # noqa: E731
        try:
            step = loop.run(window, actions, start, cfg.num_steps, cfg.steps_per_loop)
        finally:
            for writer in writers.values():
                writer.close()
        replica_state.report_agreement(self.strategy, self.state_variables(), task_name(self.strategy), step)
        return next((a.results for a in actions if isinstance(a, Evaluate)), {})

    def build_actions(self, writers: dict, eval_ds, results_path: str, best: KeepBest,
                      early_stopping: EarlyStopping) -> list[loop.Action]:
        """The actions of a run, in the order the loop calls them at every window end (the seam a
        subclass extends; ``train(extra_actions=...)`` appends, ``train.drop_actions`` leaves out
        actions by name).

        NaN restores of an earlier part of the run lower the learning rate again here.

        Raises:
          SegtrainError: train.drop_actions names an action the run does not have.
        """
        cfg, exp = self.config, self.experiment
        train_logs, eval_logs = writers[run_dir.TRAIN_LOGS], writers[run_dir.EVAL_LOGS]
        # Without periodic evaluation, still checkpoint now and then so a long run can resume.
        checkpoint_every = cfg.checkpoint_every or (cfg.eval_every or min(1000, cfg.num_steps))
        on_nan = OnNonFinite(self.checkpoints, cfg.on_nan, cfg.max_nan_restores, cfg.nan_lr_factor,
                             self.restore_after_nan, train_logs, os.path.join(self.model_dir, run_dir.NAN_RECORD),
                             self.chief)
        if self.lr_factor is not None:  # the restores of an earlier part of this run still count
            self.lr_factor.assign(on_nan.lr_factor)
        evaluator = exp.evaluator()
        trial = trial_from_environment()  # a trial of `segtrain tune` (segtrain.train.pruning)
        multi_worker = isinstance(self.strategy, tf.distribute.MultiWorkerMirroredStrategy)
        actions = [
            *([WriteConfig(self.model_dir, train_logs)] if self.chief else []),
            on_nan,
            TrainSummaries(train_logs),
            ProgressLine(cfg.num_steps),
            Preemption(self.checkpoints, self.strategy, cfg.preemption_grace),
            SaveCheckpoints(self.checkpoints, checkpoint_every),
            Evaluate(evaluator, eval_ds, cfg.eval_every or None, results_path, cfg.eval_split, self.chief),
            EvalSummaries(eval_logs, exp.info.class_names),
            ImagePanels(eval_logs, eval_ds, evaluator.inference, exp.info, exp.normalization, cfg.num_image_panels),
            *(trackers.build(cfg.trackers, self.model_dir, exp.info.class_names) if self.chief else []),
            best,
            early_stopping,
            *([ReportToStudy(trial, self.model_dir, multi_worker)] if trial else []),
            *([HParams(self.model_dir)] if self.chief else []),
            *([Profiler(cfg.profile_steps, self.model_dir, cfg.num_steps, self.chief)] if cfg.profile_steps else []),
        ]
        names = [loop.action_name(a) for a in actions]
        unknown = [n for n in cfg.drop_actions if n not in names and n not in _CHIEF_ONLY]
        if unknown:
            raise SegtrainError(f"train.drop_actions names {', '.join(map(repr, unknown))}, which this run does "
                                f"not have; its actions: {', '.join(names)}.")
        return [a for a in actions if loop.action_name(a) not in cfg.drop_actions]

    def state_variables(self) -> list:
        """The state every replica must hold alike: the model's weights (batch-norm statistics
        included), the optimizer's variables and the step."""
        return [*self.model.weights, *self.optimizer.variables, self.step]

    def _final_evaluation(self, step: int, results_path: str, best: KeepBest) -> dict:
        """The evaluation at the end of a run that was killed after its last save, before or
        while it evaluated: what the last window's actions would have done."""
        cfg, exp = self.config, self.experiment
        print(f"{self.model_dir} is at step {step}, but its final evaluation did not finish: evaluating it now.")
        if self.chief:  # what the interrupted evaluation wrote is written again
            summaries.purge_after(os.path.join(self.model_dir, run_dir.EVAL_LOGS), step - 1)
        eval_ds = exp.eval_dataset(cfg.eval_split)
        writer = summaries.EventWriter(os.path.join(self.model_dir, run_dir.EVAL_LOGS) if self.chief else None)
        evaluate = Evaluate(exp.evaluator(), eval_ds, None, results_path, cfg.eval_split, self.chief)
        window = loop.Window(step, 0, np.zeros(0, np.float32), {}, 0.0, last=True)
        try:
            for action in (evaluate, EvalSummaries(writer, exp.info.class_names), best):
                action(window)
            evaluate.end(step)
        finally:
            writer.close()
        return evaluate.results

    def restore_after_nan(self, path: str, lr_factor: float) -> int:
        """Loads checkpoint ``path`` (weights, optimizer, step) and sets the learning-rate factor;
        returns the restored step."""
        restore_checkpoint(self.checkpoints.checkpoint, path)
        self.lr_factor.assign(lr_factor)
        return int(self.step.numpy())

    def _check_output(self, size) -> None:
        """One eager forward pass: a model must return [B,H,W,num_classes] logits at input size.

        Checked before tracing, where an error would be buried in framework context.
        """
        logits = self.model(tf.zeros([1, *size, self.experiment.info.channels]), training=False)
        cfg, num_classes = self.config, self.experiment.info.num_classes
        if logits.shape.rank != 4 or logits.shape[-1] != num_classes:
            raise SegtrainError(
                f"Model '{cfg.model}' returned logits of shape {tuple(logits.shape)}, but dataset "
                f"'{cfg.dataset}' has {num_classes} classes: a model must return logits "
                f"[B,H,W,num_classes]."
            )
        if tuple(logits.shape[1:3]) != tuple(size):
            raise SegtrainError(
                f"Model '{cfg.model}' returned logits of size {tuple(logits.shape[1:3])} for "
                f"images of size {tuple(size)}: models must return logits at input size."
            )


# Actions that only the chief runs: naming them in train.drop_actions is fine on every worker.
_CHIEF_ONLY = ("write_config", "hparams", *trackers.TRACKERS)


def _unevaluated(results_path: str, step: int) -> bool:
    """Whether the results of the evaluation at ``step`` are missing (a run killed in it)."""
    if not os.path.exists(results_path):
        return True
    return read_json(results_path).get("step") != step

