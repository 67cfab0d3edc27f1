"""`segtrain data-service`: a tf.data service dispatcher, or a worker of one, until SIGTERM/Ctrl-C.

    segtrain data-service --port=5050                                  # the dispatcher
    segtrain data-service --port=5051 --dispatcher=HOST:5050 [--host=NAME]   # a worker

Training jobs send their input pipeline to the dispatcher with
``pipeline.data_service_address = 'grpc://HOST:5050'`` (segtrain.data.service); the workers run
it and stream the batches to them.
"""

from __future__ import annotations

import signal
import socket
import threading

from absl import flags

from segtrain.commands.common_flags import verbosity_flag
from segtrain.data import service
from segtrain.errors import SegtrainError


def run(port: int, dispatcher: str | None = None, host: str | None = None) -> int:
    """Serves until SIGTERM or Ctrl-C; returns 0 then.

    Args:
      port: the port to serve on (0: a free one, printed).
      dispatcher: the dispatcher's HOST:PORT: serve as its worker; None: be the dispatcher.
      host: the name others reach this machine by (default: its hostname). A worker hands it
        to the training jobs, which fetch their batches from it.
    """
    if port is None:
        raise SegtrainError("--port is required: the port to serve on, e.g. --port=5050 (0: any free port).")
    host = host or socket.gethostname()
    if dispatcher is None:
        server, port = service.start_dispatcher(port)
        print(f"tf.data service dispatcher at grpc://{service.host_port(host, port)}: train with "
              f"--gin_param=\"{service.FLAG} = 'grpc://{service.host_port(host, port)}'\"; add workers with "
              f"`segtrain data-service --port=P --dispatcher={service.host_port(host, port)}`", flush=True)
    else:
        server, port = service.start_worker(dispatcher, port, host, flag="--dispatcher")
        print(f"tf.data service worker at {service.host_port(host, port)}, registered with dispatcher "
              f"{dispatcher}", flush=True)
    wait_for_signal()
    # join() would block in C++, where Python's signal handlers never run: wait here, then stop.
    server.stop()
    print("tf.data service stopped.", flush=True)
    return 0


def wait_for_signal() -> None:
    """Blocks until SIGTERM or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


def define_flags(fv):
    flags.DEFINE_integer("port", None, "The port to serve on (0: any free port; the address is printed).",
                         lower_bound=0, flag_values=fv)
    flags.DEFINE_string("dispatcher", None, "Serve as a worker of the dispatcher at HOST:PORT (without it: be "
                        "the dispatcher that training jobs name in pipeline.data_service_address).",
                        flag_values=fv)
    flags.DEFINE_string("host", None, "The name or IP the training jobs reach this machine by (default: its "
                        "hostname); a worker's batches are fetched from it.", flag_values=fv)
    verbosity_flag(fv)


def main(fv: flags.FlagValues) -> int:
    """`segtrain data-service` from its parsed flags."""
    return run(fv.port, fv.dispatcher, fv.host)
