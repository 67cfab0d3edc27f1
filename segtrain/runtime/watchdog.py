"""Bounds the wait of a multi-worker task for its peers (runs as its own small process).

MultiWorkerMirroredStrategy's constructor blocks in native code until every task has joined:
it holds the interpreter, ignores SIGTERM, and may never return when a peer is missing. A
thread cannot interrupt it, so a separate process (this module, free of TensorFlow so it starts
at once) waits out the timeout, names the peers it cannot reach, and ends the task with SIGKILL.

    python -m segtrain.runtime.watchdog PID TIMEOUT JSON
    JSON: {"task": "worker 0 (127.0.0.1:2222)", "source": "TF_CONFIG",
           "peers": [["worker 1", "127.0.0.1:2223"], ...]}
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time


def reachable(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at "host:port"."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def message(info: dict, timeout: float) -> str:
    missing = [f"{name} at {address}" for name, address in info["peers"] if not reachable(address)]
    who = ("cannot connect to " + ", ".join(missing)) if missing else (
        "every peer accepts connections, but not all of them joined")
    return (
        f"error: {info['source']} task {info['task']} could not form its cluster within {timeout:g} s "
        f"(distribute.connect_timeout): {who}. Start every task with the same cluster description, "
        f"and check that these addresses are reachable from this machine."
    )


def main(argv: list[str]) -> int:
    pid, timeout, info = int(argv[1]), float(argv[2]), json.loads(argv[3])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        try:
            os.kill(pid, 0)
        except ProcessLookupError:  # the task ended by itself
            return 0
    print(message(info, timeout), file=sys.stderr, flush=True)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
