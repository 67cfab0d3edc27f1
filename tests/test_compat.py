"""Every private TensorFlow, Keras and gin API segtrain uses (segtrain.compat), each on a small
case: a failure here names the API an upgrade changed, before a user meets it in a run."""

from __future__ import annotations

import gin
import keras
import numpy as np
import pytest
import tensorflow as tf

from segtrain import compat


def test_gin_lists_its_configurables_and_their_functions():
    @gin.configurable("compat_probe")
    def probe(alpha=1, beta=2):
        return alpha + beta

    assert "compat_probe" in compat.gin_configurable_names(), "gin.config._REGISTRY changed"
    assert list(__import__("inspect").signature(compat.gin_configurable_function("compat_probe")).parameters) == \
        ["alpha", "beta"], "gin.config._REGISTRY.get_match(...).wrapped changed"


def test_keras_gives_a_nested_models_call_in_its_outer_graph():
    inner_in = keras.Input((4, 4, 3))
    inner = keras.Model(inner_in, [keras.layers.Conv2D(2, 1)(inner_in), keras.layers.Conv2D(3, 1)(inner_in)],
                        name="inner")
    outer_in = keras.Input((4, 4, 3))
    outer = keras.Model(outer_in, inner(outer_in)[1])
    outputs = compat.layer_call_outputs(outer, inner)
    assert [tuple(o.shape) for o in outputs] == [(None, 4, 4, 2), (None, 4, 4, 3)], \
        "keras.src.ops.function.make_node_key, Layer._inbound_nodes or Functional._nodes changed"


def test_tensorflow_says_when_a_graph_compiles_with_xla():
    seen = []

    @tf.function(jit_compile=True)
    def compiled(x):
        seen.append(compat.in_xla_context())
        return x + 1

    @tf.function
    def plain(x):
        seen.append(compat.in_xla_context())
        return x + 1

    compiled(tf.constant(1.0))
    plain(tf.constant(1.0))
    assert seen == [True, False], "tensorflow.python.ops.control_flow_util.GraphOrParentsInXlaContext changed"


def test_tensorflow_serialises_a_datasets_graph():
    graph = compat.serialized_graph(tf.data.Dataset.range(3).map(lambda x: tf.numpy_function(np.square, [x],
                                                                                             tf.int64)))
    assert "PyFunc" in {node.op for f in graph.library.function for node in f.node_def}, \
        "tf.data.Dataset._as_serialized_graph changed"


def test_tensorflow_freezes_a_functions_variables():
    variable = tf.Variable(3.0)
    concrete = tf.function(lambda x: x * variable).get_concrete_function(tf.TensorSpec([], tf.float32))
    frozen = compat.frozen_function(concrete)
    assert not frozen.graph.variables and not frozen.captured_inputs, "convert_variables_to_constants_v2 changed"
    result = frozen(tf.constant(2.0))
    assert float(result[0] if isinstance(result, (list, tuple)) else result) == 6.0


@pytest.mark.slow  # configures this process's eager context: a process of its own
def test_tensorflow_configures_the_coordination_service():
    import subprocess
    import sys

    code = ("from segtrain import compat; compat.configure_coordination_service("
            "'/job:worker/replica:0/task:0', {'worker': 2}, 20000); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok" in done.stdout, (
        "tensorflow.compiler.xla.tsl.protobuf.coordination_config_pb2 or "
        "context.configure_coordination_service changed: " + done.stderr[-2000:])
