"""The plugin registry: one naming system for every named choice of segtrain.

Models, backbones, losses, metrics, datasets, optimizers, learning-rate schedules and
post-processors are each a ``Registry``.

A plugin is registered under a name; registering also makes it gin-configurable in the
module named after its kind, so ``models.unet.base_filters = 32`` in a gin file sets an
argument of the ``unet`` model, and ``train.model = 'unet'`` selects it.

Plugins from other installed packages are found through the entry-point group
``segtrain.plugins``: the module an entry point names is imported on the first lookup,
and registers its plugins as it is imported.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.metadata
import inspect
import re
import threading
from typing import Any, Callable, Iterable, TypeVar

import gin

__all__ = [
    "BACKBONES",
    "DATASETS",
    "LOSSES",
    "METRICS",
    "MODELS",
    "OPTIMIZERS",
    "POSTPROCESSORS",
    "SCHEDULES",
    "PLUGIN_GROUP",
    "Registry",
    "RegistryError",
    "all_registries",
    "load_all",
    "load_plugins",
    "snake_case",
    "variant",
]

PLUGIN_GROUP = "segtrain.plugins"

F = TypeVar("F", bound=Callable[..., Any])


class RegistryError(ValueError):
    """An unknown or duplicate plugin name."""


def snake_case(name: str) -> str:
    """``DeepLabV3Plus`` -> ``deep_lab_v3_plus``; ``unet`` stays ``unet``."""
    name = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name).lower()


_plugins_lock = threading.Lock()
_plugins_loaded = False
_plugin_errors: list[str] = []


def load_plugins() -> list[str]:
    """Imports every module declared in the ``segtrain.plugins`` entry-point group once.

    Returns:
      The names of the entry points that were loaded by this call (empty after the first).

    Raises:
      RegistryError: an entry point could not be imported; names the entry point and package.
    """
    global _plugins_loaded
    with _plugins_lock:
        if _plugins_loaded:
            return []
        loaded = []
        for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP):
            try:
                ep.load()
            except Exception as e:  # a broken third-party package must say which one
                dist = getattr(ep, "dist", None)
                owner = f" from package '{dist.name}'" if dist is not None else ""
                raise RegistryError(
                    f"Could not import segtrain plugin '{ep.name} = {ep.value}'{owner}: "
                    f"{type(e).__name__}: {e}. Fix or uninstall that package."
                ) from e
            loaded.append(ep.name)
        # Only once every entry point imported: after a failure, the next lookup retries and
        # reports the same error instead of silently missing the plugins.
        _plugins_loaded = True
        return loaded


class Registry:
    """Maps names to plugin factories of one kind (``models``, ``losses``, ...).

    Args:
      kind: the kind of plugin; also the gin module its plugins are configurable in.
      singular: the kind in the singular, for messages ('loss').
      locations: modules that register the built-in plugins of this kind; imported on the
        first lookup, so importing the registry alone stays cheap.
      framework_args: arguments segtrain itself passes to every plugin of this kind (a model's
        ``num_classes``); a gin binding of one would be overridden, so gin refuses it.
    """

    def __init__(self, kind: str, locations: Iterable[str] = (), singular: str | None = None,
                 framework_args: Iterable[str] = ()):
        self.kind = kind
        self.singular = singular or kind.removesuffix("s")
        self.locations = tuple(locations)
        self.framework_args = tuple(framework_args)
        self._locations_loaded = False
        self._entries: dict[str, Callable[..., Any]] = {}
        self._originals: dict[str, Callable[..., Any]] = {}

    def register(
        self, name: str | Callable[..., Any] | None = None, *, override: bool = False
    ) -> Callable[[F], F]:
        """Decorator that registers a factory under ``name`` (default: snake_case of its name).

        Usable bare (``@MODELS.register``) or called (``@MODELS.register('my_net')``).
        The decorated function is returned unchanged; the registry keeps its gin-configurable
        twin, so gin bindings such as ``models.my_net.width = 8`` apply when it is built by name.

        Raises:
          RegistryError: the name is taken and ``override`` is False.
        """
        if callable(name):  # used bare: @REGISTRY.register
            return self.register(None, override=override)(name)

        def decorator(fn: F) -> F:
            key = name or snake_case(fn.__name__)
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise RegistryError(
                    f"Invalid {self.kind} name {key!r}: use letters, digits and underscores."
                )
            if key in self._entries and not override:
                raise RegistryError(
                    f"{self.singular.capitalize()} name {key!r} is already registered "
                    f"(by {_where(self._originals[key])}); pick another name or pass "
                    f"override=True to replace it."
                )
            params = _parameters(fn)
            denylist = [a for a in self.framework_args if a in params]
            # gin refuses a second configurable of the same name outside interactive mode.
            with gin.config.interactive_mode() if override else contextlib.nullcontext():
                self._entries[key] = gin.external_configurable(fn, name=key, module=self.kind, denylist=denylist)
            self._originals[key] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        """Returns the gin-configurable factory registered under ``name``.

        Raises:
          RegistryError: unknown name; the message lists the known names and the closest ones.
        """
        self._load()
        if not isinstance(name, str):
            raise RegistryError(
                f"A {self.singular} plugin is chosen by its name (a string), got {name!r}."
            )
        try:
            return self._entries[name]
        except KeyError:
            raise RegistryError(self._unknown_message(name)) from None

    def _load(self) -> None:
        if not self._locations_loaded:
            for module in self.locations:
                importlib.import_module(module)
            self._locations_loaded = True
        load_plugins()

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def names(self) -> list[str]:
        """Sorted names of every registered plugin, third-party plugins included."""
        self._load()
        return sorted(self._entries)

    def original(self, name: str) -> Callable[..., Any]:
        """The undecorated function registered under ``name`` (for signatures and docs)."""
        self.get(name)
        return self._originals[name]

    def describe(self, name: str) -> tuple[str, str]:
        """Returns (one-line doc, argument list) of a plugin, for ``segtrain list``."""
        fn = self.original(name)
        doc = (inspect.getdoc(fn) or "").strip().splitlines()
        return (doc[0] if doc else ""), _signature(fn)

    def _unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
        hint = f" Did you mean {_quoted(close, 'or')}?" if close else ""
        return (
            f"Unknown {self.singular} {name!r}.{hint} "
            f"Known {self.kind}: {_quoted(known, 'and') or 'none'}. Third-party plugins are "
            f"found through the '{PLUGIN_GROUP}' entry-point group."
        )

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {len(self._entries)} entries)"


def _quoted(items: Iterable[str], last: str) -> str:
    items = [f"'{i}'" for i in items]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {last} {items[-1]}"


def _where(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _parameters(fn: Callable[..., Any]) -> list[str]:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def variant(builder: Callable[..., Any], name: str, doc: str, **fixed: Any) -> Callable[..., Any]:
    """A thin variant of ``builder`` with some arguments fixed (timm's pattern).

    The variant's signature is the builder's without the fixed arguments, so gin checks
    bindings against it (``models.fcn8s.fc_filters``) and ``segtrain list`` shows it.

    Args:
      builder: the function every variant calls.
      name: the variant's function name (its default registry name).
      doc: the variant's docstring (first line: what it is; a ``Source:`` line if any).
      **fixed: arguments the variant always passes.
    """
    signature = inspect.signature(builder)
    unknown = set(fixed) - set(signature.parameters)
    if unknown:
        raise TypeError(f"variant {name!r}: {builder.__name__} has no argument(s) {sorted(unknown)}")

    def fn(*args, **kwargs):
        return builder(*args, **kwargs, **fixed)

    fn.__signature__ = signature.replace(
        parameters=[p for n, p in signature.parameters.items() if n not in fixed])
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    fn.__module__ = builder.__module__
    return fn


def _signature(fn: Callable[..., Any]) -> str:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return "(...)"
    parts = []
    for p in sig.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            parts.append(("*" if p.kind == p.VAR_POSITIONAL else "**") + p.name)
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={p.default!r}")
    return "(" + ", ".join(parts) + ")"


MODELS = Registry("models", locations=("segtrain.models",), framework_args=("num_classes",))
BACKBONES = Registry("backbones", locations=("segtrain.models",))
LOSSES = Registry("losses", locations=("segtrain.losses",), singular="loss",
                  framework_args=("ignore_label", "class_statistics"))
METRICS = Registry("metrics", locations=("segtrain.metrics",))
DATASETS = Registry("datasets", locations=("segtrain.data",), framework_args=("split",))
OPTIMIZERS = Registry("optimizers", locations=("segtrain.train.optimizers",), framework_args=("learning_rate",))
SCHEDULES = Registry("schedules", locations=("segtrain.train.optimizers",), framework_args=("base", "decay_steps"))
POSTPROCESSORS = Registry("postprocessors", locations=("segtrain.postprocess",))


def all_registries() -> dict[str, Registry]:
    """Every registry by kind, in the order ``segtrain list`` shows them."""
    return {r.kind: r for r in (MODELS, BACKBONES, LOSSES, METRICS, DATASETS, OPTIMIZERS, SCHEDULES,
                                   POSTPROCESSORS)}


def load_all() -> None:
    """Registers every built-in and third-party plugin; call before parsing gin files."""
    for r in all_registries().values():
        r.names()
