#!/usr/bin/env python3
"""Runs a multi-worker `segtrain train` on this machine: N worker processes on 127.0.0.1.

    python launch/local.py --num_workers=2 -- --gin_file=gin/quickstart.gin --model_dir=runs/mw
    python launch/local.py --num_workers=2 --command=doctor -- --gin_file=gin/quickstart.gin --model_dir=runs/mw

Each worker gets a free port and its own TF_CONFIG (worker 0 is the chief), so the run uses
MultiWorkerMirroredStrategy exactly as on a cluster. Worker output is streamed with a
``[worker i]`` prefix. The launcher always reaps every worker, and exits with:

- 0 when every worker finished;
- the status of the first worker that failed (128 + N for one killed by signal N, which it
  names), as soon as one fails: the others get SIGTERM, and --grace seconds to exit with their
  own message before SIGKILL;
- on SIGTERM or SIGINT (Ctrl-C) to the launcher: it sends SIGTERM to every worker (each saves a
  checkpoint at its next window end and exits 143), waits up to --grace seconds, and exits with
  the status of the first worker that did not exit 0 (143 when all saved), else 0. A second
  signal ends the workers at once with SIGKILL;
- 124 when --timeout runs out (the workers are stopped as above).

--grace (default 30 s) is the time between SIGTERM and SIGKILL. A worker still waiting for its
peers ignores SIGTERM, hence the SIGKILL.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

from segtrain.runtime.cluster import local_tf_configs as tf_configs

GRACE_SECONDS = 30.0
FORWARDED = (signal.SIGTERM, signal.SIGINT)


def exit_status(returncode: int) -> int:
    """A process's status as a shell reports it: 128 + N for one killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def describe_exit(returncode: int) -> str:
    """How a process ended: "exited with status 3", or "was killed by signal 9 (SIGKILL)"."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = f" ({signal.Signals(-returncode).name})"
    except ValueError:
        name = ""
    return f"was killed by signal {-returncode}{name}"


class Worker:
    """One worker process, its output streamed with a ``[worker i]`` prefix, and when it exited."""

    def __init__(self, index: int, command: list[str], env: dict, lock: threading.Lock):
        self.index = index
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, bufsize=1, start_new_session=True)
        self.exited_at: float | None = None
        self.killed = False  # by the launcher, after --grace
        self._stream = threading.Thread(target=self._copy, args=(lock,), daemon=True)
        self._waiter = threading.Thread(target=self._wait, daemon=True)
        self._stream.start()
        self._waiter.start()

    def _copy(self, lock: threading.Lock) -> None:
        prefix = f"[worker {self.index}]"
        for line in iter(self.proc.stdout.readline, ""):
            with lock:
                sys.stdout.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
                sys.stdout.flush()
        self.proc.stdout.close()

    def _wait(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.exited_at is not None else None

    def signal(self, sig: int) -> None:
        """Signals the worker's whole process group (it and what it started), if it still runs."""
        if self.returncode is None:
            _signal_group(self.proc.pid, sig)

    def join(self) -> None:
        """Waits for the worker, then ends what it started and left behind in its process group."""
        self._waiter.join()
        _signal_group(self.proc.pid, signal.SIGKILL)
        self._stream.join(timeout=5)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop(workers: list[Worker], grace: float, hurry=lambda: False) -> None:
    """SIGTERM every running worker, SIGKILL what is left after ``grace`` seconds (or as soon as
    ``hurry()`` says so), then reap them all."""
    for worker in workers:
        worker.signal(signal.SIGTERM)
    end = time.monotonic() + grace
    while any(w.returncode is None for w in workers) and time.monotonic() < end and not hurry():
        time.sleep(0.1)
    for worker in workers:
        if worker.returncode is None:
            worker.killed = True
            worker.signal(signal.SIGKILL)
    for worker in workers:
        worker.join()


def report(workers: list[Worker], grace: float) -> None:
    for worker in workers:
        if worker.killed:
            print(f"launch: worker {worker.index} did not exit within --grace={grace:g} s of SIGTERM; "
                  f"killed it (SIGKILL).", file=sys.stderr, flush=True)
        else:
            print(f"launch: worker {worker.index} {describe_exit(worker.proc.returncode)}.", file=sys.stderr,
                  flush=True)


COMMANDS = ("train", "doctor")


def train_command(train_flags: list[str], command: str = "train") -> list[str]:
    """The worker command: `segtrain train` (or `segtrain doctor`, its pre-flight check, which
    takes the same flags) with multi_worker unless a strategy is given."""
    flags = list(train_flags)
    if not any(f.startswith("--strategy") for f in flags):
        flags.append("--strategy=multi_worker")
    return [sys.executable, "-m", "segtrain.cli", command, *flags]


def launch(num_workers: int, command: list[str], timeout: float | None = None,
           grace: float = GRACE_SECONDS) -> int:
    """Starts ``command`` as ``num_workers`` workers and supervises them; returns the exit status
    (see the module doc)."""
    lock = threading.Lock()
    workers: list[Worker] = []
    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in FORWARDED:
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        for i, tf_config in enumerate(tf_configs(num_workers)):
            env = dict(os.environ, TF_CONFIG=tf_config, PYTHONUNBUFFERED="1")
            workers.append(Worker(i, command, env, lock))
        pids = ", ".join(str(w.proc.pid) for w in workers)
        print(f"launch: started {num_workers} workers (pids {pids}): {' '.join(command)}", flush=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if received:
                name = signal.Signals(received[0]).name
                print(f"launch: received {name}; sending SIGTERM to the workers, which save and stop, and "
                      f"waiting up to --grace={grace:g} s for them (again: stop them at once).",
                      file=sys.stderr, flush=True)
                stop(workers, grace, hurry=lambda: len(received) > 1)
                report(workers, grace)
                codes = [exit_status(w.proc.returncode) for w in workers]
                return next((c for c in codes if c != 0), 0)
            failed = sorted((w for w in workers if w.returncode not in (None, 0)), key=lambda w: w.exited_at)
            if failed:
                first = failed[0]
                print(f"launch: worker {first.index} {describe_exit(first.returncode)}; stopping the other "
                      f"workers (SIGTERM, then SIGKILL after --grace={grace:g} s).",
                      file=sys.stderr, flush=True)
                others = [w for w in workers if w is not first]
                stop(others, grace)
                report(others, grace)
                return exit_status(first.returncode)
            if all(w.returncode == 0 for w in workers):
                print(f"launch: all {num_workers} workers finished.", flush=True)
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: --timeout={timeout:g} s ran out; stopping the workers.",
                      file=sys.stderr, flush=True)
                stop(workers, grace)
                report(workers, grace)
                return 124
            time.sleep(0.2)
    finally:
        stop(workers, grace)  # after an unexpected error; the workers are gone otherwise
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, train_flags = argv[:split], argv[split + 1:]
    else:
        own, train_flags = argv, []
    parser = argparse.ArgumentParser(
        description="Run `segtrain train` as N MultiWorkerMirroredStrategy workers on this machine.",
        usage="python launch/local.py --num_workers=N [--command=train|doctor] [--timeout=S] [--grace=S] "
              "-- <segtrain train flags>",
    )
    parser.add_argument("--command", choices=COMMANDS, default="train",
                        help="what every worker runs: train (default), or doctor, the pre-flight check of the "
                             "same job")
    parser.add_argument("--num_workers", type=int, required=True, help="worker processes to start (>= 1)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every worker and exit 124 after this many seconds (default: none)")
    parser.add_argument("--grace", type=float, default=GRACE_SECONDS,
                        help="seconds between SIGTERM and SIGKILL when stopping workers "
                             f"(default: {GRACE_SECONDS:g})")
    args = parser.parse_args(own)
    if args.num_workers < 1:
        parser.error(f"--num_workers={args.num_workers}: use 1 or more")
    if args.grace < 0:
        parser.error(f"--grace={args.grace:g}: use 0 or more seconds")
    if not train_flags:
        parser.error("give the segtrain train flags after `--`, e.g. "
                     "-- --gin_file=gin/quickstart.gin --model_dir=runs/mw")
    return launch(args.num_workers, train_command(train_flags, args.command), args.timeout, args.grace)


if __name__ == "__main__":
    sys.exit(main())
