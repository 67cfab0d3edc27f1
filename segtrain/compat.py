"""Every private TensorFlow, Keras and gin API segtrain uses, fenced in one place.

Each function is what segtrain needs from one private API that has no public equivalent, with
what it does and why. ``tests/test_compat.py`` calls every one of them on a small case: when an
upgrade of TensorFlow, Keras or gin removes or changes one, that test names it.
"""

from __future__ import annotations

import gin
import keras
import tensorflow as tf


def configure_coordination_service(leader: str, jobs: dict[str, int], heartbeat_timeout_ms: int) -> None:
    """Configures the coordination service MultiWorkerMirroredStrategy would start, with our
    heartbeat timeout (the strategy sets it up only when nothing did, with TensorFlow's default
    timeout, and there is no public setting for it).

    Args:
      leader: the task hosting the service, e.g. '/job:worker/replica:0/task:0'.
      jobs: {job name: number of tasks} of the coordinated jobs.
      heartbeat_timeout_ms: after how long without a heartbeat a task counts as lost.
    """
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    coordinated = [coordination_config_pb2.CoordinatedJob(name=name, num_tasks=n) for name, n in jobs.items()]
    context.context().configure_coordination_service(
        service_type="standalone", service_leader=leader, coordinated_jobs=coordinated,
        heartbeat_timeout_in_ms=heartbeat_timeout_ms)


def gin_configurable_names() -> list[str]:
    """Every registered gin configurable's name, with and without its module (gin lists none
    publicly; the names serve "did you mean" in error messages only)."""
    configurables = [c for _, c in gin.config._REGISTRY.items()]
    return sorted({".".join(filter(None, (c.module, c.name))) for c in configurables}
                  | {c.name for c in configurables})


def gin_configurable_function(selector: str):
    """The function behind gin configurable ``selector`` (for its parameters' names)."""
    return gin.config._REGISTRY.get_match(selector).wrapped


def layer_call_outputs(graph: keras.Model, layer) -> list:
    """The outputs of ``layer``'s call inside functional model ``graph``.

    A nested model's ``.output`` is its own inner graph's; its call in the outer graph is one of
    its inbound nodes, the one the outer graph holds (Keras keeps both lists private).
    """
    from keras.src.ops.function import make_node_key

    nodes = [node for i, node in enumerate(layer._inbound_nodes) if make_node_key(layer, i) in graph._nodes]
    return keras.tree.flatten(nodes[0].output_tensors) if nodes else []


def in_xla_context() -> bool:
    """Whether the graph being traced compiles with XLA (jit_compile), which host code (a
    numpy_function) cannot join. TensorFlow has no public test for it."""
    from tensorflow.python.ops import control_flow_util

    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def serialized_graph(dataset: tf.data.Dataset) -> tf.compat.v1.GraphDef:
    """The GraphDef a tf.data service would send its workers for ``dataset``."""
    return tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())


def frozen_function(concrete: tf.types.experimental.ConcreteFunction) -> tf.types.experimental.ConcreteFunction:
    """``concrete`` with the variables it reads folded into constants. TFLite's converter keeps a
    Keras 3 model's variables as READ_VARIABLE ops, which the LiteRT interpreter then reads as
    NaN; TensorFlow has no public way to freeze a function (tf2onnx uses this one too)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    return convert_variables_to_constants_v2(concrete)
