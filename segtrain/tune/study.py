"""The study: Optuna samples gin bindings, each trial is a `segtrain train` run of its own.

    parent/study.db           the Optuna study (SQLite): every trial, its bindings, reports, state
    parent/trial_<n>/         trial n's run directory (checkpoints, TensorBoard logs, HParams)
    parent/trial_<n>/train.log   what the trial's `segtrain train` printed
    parent/best.gin           the best trial's configuration, ready to train with

A trial is a child process, ``segtrain train`` with the study's gin files and bindings plus the
trial's own, so it is a normal run: it resumes, it writes TensorBoard's HParams session, and a
crash in it fails that trial alone (recorded as failed, with its last line) while the study goes
on. The child reports each evaluation of ``train.best_metric`` to the study and stops when the
pruner says so (segtrain.train.pruning); its objective is the best value of that metric, the one
its best checkpoint holds. ``parallel`` trials run at once, each on its own share of the machine:
GPUs divided among them, or on a machine without GPUs, disjoint sets of CPU cores.

A study is resumable: ``tune`` run again on the same parent goes on to ``num_trials``. Trials
that were running when it stopped (killed, or stopped with Ctrl-C: the children save a checkpoint
as a preempted job does) are recorded as failed and started again under a new number in their
own directory, from their latest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Sequence

from segtrain import run_dir
from segtrain.errors import SegtrainError
from segtrain.io import atomic_write_text, read_json
from segtrain.train.pruning import PRUNED_RECORD, TRIAL_ENV, make_pruner  # what a trial reads and leaves
from segtrain.tune.space import Space

STUDY_DB = "study.db"
STUDY_NAME = "segtrain"
BEST_GIN = "best.gin"
TRIAL_LOG = "train.log"


@dataclasses.dataclass
class Objective:
    """What the study optimises: the trials' ``train.best_metric`` on ``train.eval_split``."""

    metric: str
    mode: str  # 'max' or 'min'
    split: str

    @property
    def direction(self) -> str:
        return "maximize" if self.mode == "max" else "minimize"


@dataclasses.dataclass
class Slot:
    """One trial's share of the machine: its environment and CPU cores, and how it is said."""

    env: dict
    cores: tuple[int, ...] | None
    describe: str


def storage_url(parent: str) -> str:
    return f"sqlite:///{os.path.abspath(os.path.join(parent, STUDY_DB))}"


def storage(parent: str):
    """The study's RDB storage; SQLite waits for a writer (another trial) instead of failing."""
    import optuna

    return optuna.storages.RDBStorage(storage_url(parent), engine_kwargs={"connect_args": {"timeout": 60}})


def device_slots(parallel: int) -> list[Slot]:
    """How ``parallel`` trials share the machine.

    GPUs (CUDA_VISIBLE_DEVICES, else ``nvidia-smi -L``): divided among the trials, or, with fewer
    GPUs than trials, shared round-robin with memory growth on. No GPU: the CPU cores this
    process may use, in disjoint sets (each trial's TensorFlow sizes its thread pools to them).

    Raises:
      SegtrainError: more trials at once than CPU cores on a machine without GPUs.
    """
    gpus = visible_gpus()
    slots = []
    if gpus:
        for i in range(parallel):
            mine = gpus[i::parallel] if len(gpus) >= parallel else [gpus[i % len(gpus)]]
            shared = len(gpus) < parallel
            env = {"CUDA_VISIBLE_DEVICES": ",".join(mine)}
            if shared:
                env["TF_FORCE_GPU_ALLOW_GROWTH"] = "true"
            slots.append(Slot(env, None, f"GPU {','.join(mine)}" + (" (shared)" if shared else "")))
        return slots
    cores = sorted(os.sched_getaffinity(0))
    if parallel > len(cores):
        raise SegtrainError(f"--parallel={parallel} trials at once, but this machine has {len(cores)} CPU core(s) and "
                            f"no GPU: use --parallel={len(cores)} or fewer.")
    share = len(cores) // parallel
    for i in range(parallel):
        mine = tuple(cores[i * share:(i + 1) * share])
        threads = str(len(mine))
        env = {"CUDA_VISIBLE_DEVICES": "", "TF_NUM_INTRAOP_THREADS": threads, "OMP_NUM_THREADS": threads}
        if parallel > 1:
            env["TF_NUM_INTEROP_THREADS"] = "1" if len(mine) == 1 else "2"
        slots.append(Slot(env, mine, f"CPU core{'s' if len(mine) > 1 else ''} {_ranges(mine)}"))
    return slots


def visible_gpus() -> list[str]:
    """The GPUs a trial may be given, by index."""
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [g.strip() for g in given.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(line for line in out.splitlines() if line.startswith("GPU "))]


def _ranges(cores: Sequence[int]) -> str:
    return f"{cores[0]}-{cores[-1]}" if len(cores) > 1 and cores[-1] - cores[0] == len(cores) - 1 else \
        ",".join(map(str, cores))


class Study:
    """A study in ``parent`` over ``space`` on top of ``gin_files`` and ``gin_params``.

    Args:
      parent: the study's directory.
      space: what to search.
      gin_files, gin_params: the configuration every trial starts from.
      objective: the metric, its direction and the split it is measured on.
      pruner: 'median', 'hyperband' or 'none'.
      seed: the sampler's seed.
    """

    def __init__(self, parent: str, space: Space, gin_files: Sequence[str], gin_params: Sequence[str],
                 objective: Objective, pruner: str = "median", seed: int = 0):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.parent, self.space, self.objective, self.pruner = parent, space, objective, pruner
        self.gin_files = [os.path.abspath(f) for f in gin_files]
        self.gin_params = list(gin_params)
        os.makedirs(parent, exist_ok=True)
        self.study = optuna.create_study(
            storage=storage(parent), study_name=STUDY_NAME, direction=objective.direction, load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4), pruner=make_pruner(pruner))
        self._check_same_study()

    def _check_same_study(self) -> None:
        """The first start records what the study is; a later start must be the same study."""
        settings = {"space": self.space.source, "gin_files": self.gin_files, "gin_params": self.gin_params,
                    "metric": self.objective.metric, "mode": self.objective.mode}
        recorded = self.study.user_attrs.get("settings")
        if recorded is None:
            self.study.set_user_attr("settings", settings)
            return
        changed = [k for k in settings if recorded.get(k) != settings[k]]
        if changed:
            raise SegtrainError(
                f"{os.path.join(self.parent, STUDY_DB)} holds a study started with another {' and '.join(changed)} "
                f"than this command's: resume it with the same --gin_file, --gin_param and --space, or give a "
                f"new --model_dir.")

    # ---- bookkeeping ---------------------------------------------------------------------
    def _resumed_numbers(self) -> set[int]:
        return {t.user_attrs["resumes"] for t in self.study.get_trials(deepcopy=False) if "resumes" in t.user_attrs}

    def finished(self) -> int:
        """Trials that ended (complete, pruned, failed), not counting those started again."""
        from optuna.trial import TrialState

        again = self._resumed_numbers()
        return sum(1 for t in self.study.get_trials(deepcopy=False)
                   if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL) and t.number not in again)

    def requeue_interrupted(self) -> list[int]:
        """Trials left running by a stopped ``tune``: failed, and queued again in their directory."""
        from optuna.trial import TrialState

        numbers = []
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            self.study.tell(t.number, state=TrialState.FAIL)
            self.study.enqueue_trial(t.params, user_attrs={"model_dir": t.user_attrs.get("model_dir"),
                                                           "resumes": t.number}, skip_if_exists=False)
            numbers.append(t.number)
        return numbers

    def best(self):
        """The best complete trial, or None."""
        from optuna.trial import TrialState

        if not self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            return None
        return self.study.best_trial

    # ---- running -------------------------------------------------------------------------
    def run(self, num_trials: int, parallel: int = 1) -> None:
        """Runs trials until ``num_trials`` have ended, ``parallel`` at a time.

        SIGINT or SIGTERM stops the running trials at a checkpoint (they are preempted) and
        raises Interrupted; the next ``tune`` resumes them.
        """
        from segtrain.errors import Interrupted

        again = self.requeue_interrupted()
        if again:
            print(f"Trial(s) {', '.join(map(str, again))} stopped with the last tune: starting them again from their "
                  f"checkpoints.")
        done = self.finished()
        if done >= num_trials:
            print(f"The study in {self.parent} has {done} trials already (--num_trials={num_trials}): nothing to run.")
            return
        slots = device_slots(parallel)
        print(f"Study {self.parent}: {num_trials - done} trial(s) to run, {parallel} at a time, "
              f"{self.objective.direction} {self.objective.metric} on '{self.objective.split}'.", flush=True)
        running: dict[int, tuple] = {}  # slot index -> (trial, process, model_dir, log file)
        stop = {"signal": None}

        def on_signal(signum, frame):
            stop["signal"] = signum

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while True:
                if stop["signal"] is not None:
                    self._stop_all(running)
                    raise Interrupted(f"tune stopped by {signal.Signals(stop['signal']).name}; the running trials "
                                      f"saved checkpoints. Run the same command again to resume the study.",
                                      stop["signal"])
                free = [i for i in range(parallel) if i not in running]
                if free and self.finished() + len(running) < num_trials:
                    running[free[0]] = self._start(slots[free[0]])
                    continue
                if not running:
                    break
                for i, (trial, process, model_dir, log) in list(running.items()):
                    if process.poll() is not None:
                        log.close()
                        del running[i]
                        self._finish(trial, process.returncode, model_dir)
                time.sleep(0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            for trial, process, model_dir, log in running.values():  # an error of the study itself
                _terminate(process)
                log.close()

    def _start(self, slot: Slot):
        trial = self.study.ask(self.space.distributions())
        model_dir = trial.user_attrs.get("model_dir") or os.path.join(self.parent, f"trial_{trial.number}")
        trial.set_user_attr("model_dir", model_dir)
        trial.set_user_attr("device", slot.describe)
        os.makedirs(model_dir, exist_ok=True)
        stale = os.path.join(model_dir, PRUNED_RECORD)
        if os.path.exists(stale):
            os.remove(stale)
        bindings = self.space.bindings(trial.params)
        command = [sys.executable, "-m", "segtrain.cli", "train", *(f"--gin_file={f}" for f in self.gin_files),
                   *(f"--gin_param={p}" for p in [*self.gin_params, *bindings]), f"--model_dir={model_dir}"]
        env = {**os.environ, **slot.env, TRIAL_ENV: json.dumps(
            {"storage": storage_url(self.parent), "study": STUDY_NAME, "trial_id": trial._trial_id,
             "number": trial.number, "metric": self.objective.metric, "pruner": self.pruner})}
        log = open(os.path.join(model_dir, TRIAL_LOG), "a", buffering=1)
        log.write(f"$ {shlex.join(command)}\n")
        cores = slot.cores

        def child_setup():
            os.setsid()  # Ctrl-C reaches tune alone, which stops the trials itself
            _die_with_parent()
            if cores:
                os.sched_setaffinity(0, cores)

        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=child_setup)
        resumed = f", resuming trial {trial.user_attrs['resumes']}" if "resumes" in trial.user_attrs else ""
        print(f"trial {trial.number} started on {slot.describe}{resumed}: {'; '.join(bindings)}", flush=True)
        return trial, process, model_dir, log

    def _finish(self, trial, returncode: int, model_dir: str) -> None:
        from optuna.trial import TrialState

        log = os.path.join(model_dir, TRIAL_LOG)
        pruned = os.path.join(model_dir, PRUNED_RECORD)
        name = f"trial {trial.number}"
        if returncode == 0 and os.path.exists(pruned):
            record = read_json(pruned)
            self.study.tell(trial, state=TrialState.PRUNED)
            print(f"{name} pruned at step {record.get('step')} ({self.objective.metric} {record.get('value'):.4f})")
            return
        value = self._value(model_dir) if returncode == 0 else None
        if value is None:
            why = (f"exit status {returncode}: {_last_line(log)}" if returncode != 0 else
                   f"it recorded no {self.objective.metric} (no evaluation ended)")
            trial.set_user_attr("error", why)
            self.study.tell(trial, state=TrialState.FAIL)
            print(f"{name} failed ({why}); its log: {log}. The study goes on.", flush=True)
            return
        self.study.tell(trial, value)
        best = self.best()
        print(f"{name} finished: {self.objective.metric} {value:.4f} (best so far: trial {best.number}, "
              f"{best.value:.4f})", flush=True)

    def _value(self, model_dir: str) -> float | None:
        """The trial's objective: the best checkpoint's value of the metric (best.json), else the
        last evaluation's."""
        best = os.path.join(model_dir, run_dir.BEST_DIR, run_dir.BEST_RECORD)
        if os.path.exists(best):
            record = read_json(best)
            if record.get("metric") == self.objective.metric and record.get("value") is not None:
                return float(record["value"])
        results = os.path.join(model_dir, run_dir.in_run_results(self.objective.split))
        if os.path.exists(results):
            value = read_json(results).get(self.objective.metric)
            if value is not None and math.isfinite(float(value)):
                return float(value)
        return None

    def _stop_all(self, running: dict) -> None:
        """SIGTERM to every trial (each saves a checkpoint, as a preempted job does), then waits."""
        for trial, process, model_dir, log in running.values():
            print(f"Stopping trial {trial.number} at a checkpoint ...", flush=True)
            _terminate(process, kill=False)
        deadline = time.monotonic() + 120
        for trial, process, model_dir, log in running.values():
            try:
                process.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()
        running.clear()

    # ---- the result ----------------------------------------------------------------------
    def write_best(self) -> str | None:
        """parent/best.gin: the best trial's operative configuration, the tuned bindings repeated
        at its end; returns its path (None: no trial completed)."""
        best = self.best()
        if best is None:
            return None
        model_dir = best.user_attrs["model_dir"]
        operative = os.path.join(model_dir, run_dir.OPERATIVE_CONFIG)
        config = open(operative).read() if os.path.exists(operative) else ""
        path = os.path.join(self.parent, BEST_GIN)
        bindings = self.space.bindings(best.params)
        header = (f"# The best of the study in {os.path.abspath(self.parent)}: trial {best.number}, "
                  f"{self.objective.metric} {best.value:.4f} on '{self.objective.split}' ({model_dir}).\n"
                  f"# Train it: segtrain train --gin_file={path} --model_dir=runs/best\n"
                  f"# Below: the trial's operative configuration (every setting it ran with), then the tuned "
                  f"bindings again.\n\n")
        tuned = "\n# The tuned bindings.\n" + "\n".join(bindings) + "\n"
        atomic_write_text(path, header + config + tuned)
        return path

    def table(self) -> str:
        """Every trial, a line each: number, state, value, bindings."""
        lines = []
        for t in self.study.get_trials(deepcopy=False):
            value = "" if t.value is None else f"{t.value:.4f}"
            state = t.state.name.lower()
            if state == "fail" and t.number in self._resumed_numbers():
                state = "stopped"
            lines.append(f"  trial {t.number:>3}  {state:<8} {value:>7}  "
                         + "; ".join(self.space.bindings(t.params)) if t.params else f"  trial {t.number:>3}  {state}")
        return "\n".join(lines)


def _terminate(process: subprocess.Popen, kill: bool = True) -> None:
    if process.poll() is not None:
        return
    try:
        process.send_signal(signal.SIGTERM)
        if kill:
            process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    except OSError:
        pass


def _die_with_parent() -> None:
    """Linux: the trial gets SIGTERM when tune dies (even by SIGKILL), so it saves and ends."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _last_line(path: str) -> str:
    try:
        lines = [line.strip() for line in open(path, errors="replace").read().splitlines() if line.strip()]
    except OSError:
        return "no log"
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]
