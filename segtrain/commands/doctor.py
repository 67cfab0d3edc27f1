"""`segtrain doctor`: a pre-flight check of a job, run the way the job will run.

Give it the flags and gin files of `segtrain train` and start it as the job starts (here, with
--cpu_replicas, under launch/local.py, in a SLURM step, in a TFJob pod). Each task prints a
table: versions, the devices it sees, the precision, the cluster forming (its ports), an
all-reduce and its bandwidth, 3 training steps on N replicas against 1, every replica's copy of
the state after a window, and whether it can write where the job writes. It exits 1 when a
check fails, 0 otherwise. It takes well under a minute and writes nothing into --model_dir.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from typing import Sequence

from absl import flags

from segtrain.commands.common_flags import given
from segtrain.commands.configure import parse_config
from segtrain.commands.train import FLAG_BINDINGS, gin_value
from segtrain.commands.train import define_flags as train_flags
from segtrain.errors import SegtrainError, user_message
from segtrain.io import atomic_write_text
from segtrain.train import preflight


def run(model_dir: str | None, gin_files: Sequence[str], gin_params: Sequence[str], flags: dict) -> int:
    """Runs every check with the job's configuration; returns 1 if one failed, else 0."""
    bindings = [f"{FLAG_BINDINGS[name]} = {gin_value(name, value)!r}" for name, value in flags.items()
                if name in FLAG_BINDINGS]
    parse_config(gin_files, [*gin_params, *bindings])
    from segtrain.experiment import ExperimentConfig
    from segtrain.runtime.distribute import build_strategy, is_chief

    start = time.perf_counter()
    table = Table()
    table.add(preflight.versions())
    try:
        formed = time.perf_counter()
        strategy = build_strategy()  # first: it may split the CPU, and checks the cluster's ports
    except SegtrainError as e:
        table.add(preflight.Check("cluster", preflight.FAIL, user_message(e)))
        return table.end(start)
    table.add(preflight.Check("cluster", preflight.OK, _describe(strategy, time.perf_counter() - formed)))
    table.add(preflight.devices(strategy))
    table.add(preflight.precision(ExperimentConfig().precision))
    scratch = tempfile.mkdtemp(prefix=f"segtrain-doctor-{os.getpid()}-")
    try:
        # The checks that talk to the other replicas, in one order on every task. An error in
        # one is its FAIL row and ends them: the collectives after it would not line up.
        if table.run("all-reduce", lambda: [preflight.all_reduce(strategy)]):
            table.run("training", lambda: preflight.training(strategy, scratch))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    table.add(_model_dir(model_dir, is_chief(strategy)))
    return table.end(start)


class Table:
    """The rows, printed as they come (a hang shows where), and the verdict."""

    def __init__(self):
        self.rows: list[preflight.Check] = []
        print(f"{'check':<16} {'result':<6} detail", flush=True)

    def add(self, row: preflight.Check) -> None:
        self.rows.append(row)
        print(f"{row.name:<16} {row.status:<6} {row.detail}", flush=True)

    def run(self, name: str, checks) -> bool:
        """Adds the rows ``checks()`` returns; an error it raises is a FAIL row (returns False)."""
        try:
            rows = checks()
        except Exception as e:  # noqa: BLE001  (every failure is a row, not a traceback)
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            self.add(preflight.Check(name, preflight.FAIL, f"{type(e).__name__}: {lines[-1] if lines else ''}"[:500]))
            return False
        for row in rows:
            self.add(row)
        return True

    def end(self, start: float) -> int:
        failed = [row.name for row in self.rows if row.status == preflight.FAIL]
        took = time.perf_counter() - start
        if failed:
            print(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)} ({took:.0f} s).", file=sys.stderr,
                  flush=True)
            return 1
        print(f"doctor: every check passed ({took:.0f} s).", flush=True)
        return 0


def _describe(strategy, seconds: float) -> str:
    """Which strategy, and for a cluster: this task, its peers, where the cluster came from."""
    resolver = getattr(strategy, "cluster_resolver", None)
    kind = type(strategy).__name__
    if resolver is None or not getattr(resolver, "task_type", None):
        n = strategy.num_replicas_in_sync
        return f"{kind}, {n} replica(s) on this machine; no cluster to form"
    from segtrain.runtime.cluster import chief_task

    spec = resolver.cluster_spec().as_dict()
    tasks = sum(len(v) for v in spec.values())
    me = (resolver.task_type, int(resolver.task_id))
    role = " (chief)" if chief_task(*me, spec) else ""
    return (f"{kind}: {me[0]} {me[1]}{role} of {tasks} tasks at {spec[me[0]][me[1]]} formed in {seconds:.1f} s; "
            f"ports were free; {strategy.num_replicas_in_sync} replicas in all")


def _model_dir(model_dir: str | None, chief: bool) -> preflight.Check:
    """The chief must be able to write model_dir; the other tasks write to scratch directories."""
    if not model_dir:
        return preflight.Check("model_dir", preflight.SKIP, "give the job's --model_dir to check that the chief can write it")
    if not chief:
        scratch = tempfile.gettempdir()
        if not os.access(scratch, os.W_OK):
            return preflight.Check("model_dir", preflight.FAIL, f"this task saves into a scratch directory under {scratch}, which "
                                                f"it cannot write: set TMPDIR to a writable directory")
        reads = "it reads" if os.path.isdir(model_dir) else "when it exists, it will read"
        return preflight.Check("model_dir", preflight.OK, f"not written by this task (it saves into a scratch directory under "
                                          f"{scratch}); {reads} {model_dir} to resume")
    created = not os.path.exists(model_dir)
    probe = os.path.join(model_dir, f".segtrain-doctor-{os.getpid()}")
    try:
        os.makedirs(model_dir, exist_ok=True)
        atomic_write_text(probe, "segtrain doctor\n")
        os.remove(probe)
        free = shutil.disk_usage(model_dir).free / 2**30
    except OSError as e:
        return preflight.Check("model_dir", preflight.FAIL, f"the chief cannot write {model_dir}: {e.strerror or e}")
    finally:
        if created and os.path.isdir(model_dir) and not os.listdir(model_dir):
            os.rmdir(model_dir)
    return preflight.Check("model_dir", preflight.OK, f"the chief can write {model_dir} ({free:.1f} GiB free)")


def define_flags(fv: flags.FlagValues) -> None:
    """The flags of `segtrain train`: the doctor runs with the job's own."""
    train_flags(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain doctor` from its parsed flags."""
    return run(fv.model_dir, fv.gin_file, fv.gin_param, given(fv, FLAG_BINDINGS))
