#!/usr/bin/env python3
"""Runs a multi-worker `segtrain train` on this machine: N worker processes on 127.0.0.1.

    python launch/local.py --num_workers=2 -- --gin_file=gin/quickstart.gin --model_dir=runs/mw

Each worker gets a free port and its own TF_CONFIG (worker 0 is the chief), so the run uses
MultiWorkerMirroredStrategy exactly as on a cluster. Worker output is streamed with a
``[worker i]`` prefix. The launcher exits with the first failing worker's status as soon as one
fails (stopping the others), with 124 when --timeout runs out, and always reaps every worker.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 10


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free now (held open together while picked)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_configs(num_workers: int, host: str = "127.0.0.1") -> list[str]:
    """One TF_CONFIG per worker of a cluster of ``num_workers`` workers on ``host``."""
    workers = [f"{host}:{port}" for port in free_ports(num_workers, host)]
    return [json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})
            for i in range(num_workers)]


def _stream(prefix: str, pipe, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, ""):
        with lock:
            sys.stdout.write(f"{prefix} {line}" if line.endswith("\n") else f"{prefix} {line}\n")
            sys.stdout.flush()
    pipe.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(procs: list[subprocess.Popen], grace: float = GRACE_SECONDS) -> None:
    """SIGTERM every running worker, SIGKILL what is left after ``grace`` seconds, then reap.

    A worker still waiting for its peers ignores SIGTERM, hence the SIGKILL.
    """
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
    end = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
        proc.wait()


def train_command(train_flags: list[str]) -> list[str]:
    """The worker command: `segtrain train` with multi_worker unless a strategy is given."""
    flags = list(train_flags)
    if not any(f.startswith("--strategy") for f in flags):
        flags.append("--strategy=multi_worker")
    return [sys.executable, "-m", "segtrain.cli", "train", *flags]


def launch(num_workers: int, command: list[str], timeout: float | None = None) -> int:
    """Starts ``command`` as ``num_workers`` workers and supervises them; returns the exit status."""
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    threads: list[threading.Thread] = []

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        for i, tf_config in enumerate(tf_configs(num_workers)):
            env = dict(os.environ, TF_CONFIG=tf_config, PYTHONUNBUFFERED="1")
            proc = subprocess.Popen(
                command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                bufsize=1, start_new_session=True,
            )
            procs.append(proc)
            thread = threading.Thread(target=_stream, args=(f"[worker {i}]", proc.stdout, lock), daemon=True)
            thread.start()
            threads.append(thread)
        print(f"launch: started {num_workers} workers: {' '.join(command)}", flush=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            codes = [proc.poll() for proc in procs]
            failed = [(i, c) for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                i, code = failed[0]
                print(f"launch: worker {i} exited with status {code}; stopping the other workers.",
                      file=sys.stderr, flush=True)
                return code
            if all(c == 0 for c in codes):
                print(f"launch: all {num_workers} workers finished.", flush=True)
                return 0
            if deadline is not None and time.monotonic() > deadline:
                print(f"launch: --timeout={timeout:g} s ran out; stopping the workers.",
                      file=sys.stderr, flush=True)
                return 124
            time.sleep(0.2)
    except KeyboardInterrupt:
        print("launch: interrupted; stopping the workers.", file=sys.stderr, flush=True)
        return 130
    finally:
        stop(procs)
        for thread in threads:
            thread.join(timeout=5)
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        own, train_flags = argv[:split], argv[split + 1:]
    else:
        own, train_flags = argv, []
    parser = argparse.ArgumentParser(
        description="Run `segtrain train` as N MultiWorkerMirroredStrategy workers on this machine.",
        usage="python launch/local.py --num_workers=N [--timeout=S] -- <segtrain train flags>",
    )
    parser.add_argument("--num_workers", type=int, required=True, help="worker processes to start (>= 1)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="stop every worker and exit 124 after this many seconds (default: none)")
    args = parser.parse_args(own)
    if args.num_workers < 1:
        parser.error(f"--num_workers={args.num_workers}: use 1 or more")
    if not train_flags:
        parser.error("give the segtrain train flags after `--`, e.g. "
                     "-- --gin_file=gin/quickstart.gin --model_dir=runs/mw")
    return launch(args.num_workers, train_command(train_flags), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
