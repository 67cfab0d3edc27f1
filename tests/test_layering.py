"""Imports run one way, down the layers; no module imports itself back through others.

The layers, top to bottom (a module may import its own layer's modules and any layer below):

    cli            segtrain.cli
    commands       segtrain.commands.*          train / evaluate / predict / export / explain / prepare / list
    tune           segtrain.tune.*              a search over gin bindings: space, study, trials as processes
    train          segtrain.train.*             optimizer, step, checkpoints, loop, actions
    experiment     segtrain.experiment          gin -> dataset info, model, loss, metrics, pipelines
    evaluation     segtrain.evaluation, .inference, .tiles, .export, .explain, .failures
                                                running a model: metrics, windows and TTA, large images,
                                                serving, Grad-CAM, where a model fails
    runtime        segtrain.runtime.*           the process and its cluster: strategy, cluster, lock, watchdog
    plugins        segtrain.models.*, segtrain.losses, segtrain.metrics, segtrain.data.*,
                   segtrain.postprocess (siblings: none of the five imports another)
    base           segtrain.config, segtrain.precision, segtrain.progress, segtrain.io,
                   segtrain.errors, segtrain.images, segtrain.plots, segtrain.run_dir (a run's
                   checkpoints), segtrain.compat (private TF/Keras/gin APIs), segtrain (the package),
                   registry

Every import counts, also the ones inside functions. The data layer also stays free of gin:
the experiment configures it.
"""

from __future__ import annotations

import ast
import os

import pytest

from tests.conftest import REPO

LAYERS = [
    ("cli", ("segtrain.cli",)),
    ("commands", ("segtrain.commands",)),
    ("tune", ("segtrain.tune",)),
    ("train", ("segtrain.train",)),
    ("experiment", ("segtrain.experiment",)),
    ("evaluation", ("segtrain.evaluation", "segtrain.inference", "segtrain.tiles", "segtrain.export",
                    "segtrain.explain", "segtrain.failures")),
    ("runtime", ("segtrain.runtime",)),
    ("plugins", ("segtrain.models", "segtrain.losses", "segtrain.metrics", "segtrain.data", "segtrain.postprocess")),
    ("base", ("segtrain.config", "segtrain.precision", "segtrain.progress", "segtrain.io", "segtrain.errors",
              "segtrain.images", "segtrain.plots", "segtrain.run_dir", "segtrain.compat", "segtrain.task", "segtrain",
              "registry")),
]


def _modules() -> dict[str, str]:
    """{module name: file} of every module of segtrain and registry."""
    found = {}
    for package in ("segtrain", "registry"):
        for root, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(root, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[module.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _imports(module: str, path: str) -> set[str]:
    """The project modules ``module`` imports (``from a import b``: a.b when it is a module)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _group(module: str) -> tuple[int, str]:
    """(layer index, top-down; the plugin package) of a module."""
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {__file__}"
    return best


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _group(module)


def test_imports_only_point_down():
    upward = []
    for module, imported in GRAPH.items():
        layer, package = _group(module)
        for other in imported:
            other_layer, other_package = _group(other)
            if other_layer < layer:
                upward.append(f"{module} ({LAYERS[layer][0]}) imports {other} ({LAYERS[other_layer][0]})")
            elif other_layer == layer and LAYERS[layer][0] == "plugins" and other_package != package:
                upward.append(f"{module} imports its sibling plugin package {other}")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    cycles, state, stack = [], {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(GRAPH[module]):
            if state.get(other) == "open":
                cycles.append(" -> ".join(stack[stack.index(other):] + [other]))
            elif other not in state:
                visit(other)
        stack.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("package", ["segtrain.data", "segtrain.models", "segtrain.losses", "segtrain.metrics",
                                     "segtrain.postprocess", "segtrain.evaluation", "segtrain.inference",
                                     "segtrain.tiles", "segtrain.export", "segtrain.explain"])
def test_plugins_and_evaluation_read_no_gin(package):
    """Only the registry wires plugins to gin; the experiment configures the pipeline."""
    for module, path in MODULES.items():
        if module == package or module.startswith(package + "."):
            tree = ast.parse(open(path).read(), path)
            names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                     for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
            assert "gin" not in names, f"{module} imports gin"


def test_the_checker_sees_a_cycle_and_an_upward_import():
    """The checks above would fail on the shapes they guard against."""
    global GRAPH
    saved = GRAPH
    try:
        GRAPH = {**saved, "segtrain.evaluation": saved["segtrain.evaluation"] | {"segtrain.train.trainer"}}
        with pytest.raises(AssertionError, match="segtrain.evaluation \\(evaluation\\) imports segtrain.train.trainer"):
            test_imports_only_point_down()
        with pytest.raises(AssertionError, match="import cycles"):
            test_no_import_cycles()
    finally:
        GRAPH = saved
