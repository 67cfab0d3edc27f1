"""A search space over gin bindings, read from a YAML or gin file.

One binding per entry, its value a distribution or a fixed gin value::

    # tune.yaml                                   # or tune.gin, with '=' instead of ':'
    learning_rate.base: loguniform(1e-4, 1e-2)
    learning_rate.warmup_steps: int(0, 100, step=25)
    pipeline.max_scale: uniform(1.0, 1.5)
    train.loss: choice('cross_entropy', 'dice', 'focal')
    pipeline.crop_size: choice((48, 48), (64, 64))
    train.num_steps: 600                          # fixed: bound in every trial

Distributions: ``uniform(low, high[, step=s])``, ``loguniform(low, high)``, ``int(low, high[,
step=s])``, ``logint(low, high)``, ``choice(v1, v2, ...)``. A choice's values are gin text, kept
as written (strings, tuples, ``@references``): the trial binds ``name = v``. Optuna records each
value under the binding's name, so its dashboards and the study's best trial speak gin.
"""

from __future__ import annotations

import ast
import dataclasses
import os
import re

from segtrain.errors import SegtrainError

_NAME = re.compile(r"^[A-Za-z_][\w./]*$")


@dataclasses.dataclass(frozen=True)
class Dimension:
    """One binding the study searches.

    Attributes:
      name: the gin binding (``learning_rate.base``).
      kind: 'uniform', 'loguniform', 'int', 'logint' or 'choice'.
      low, high, step: a numeric range (None for a choice).
      choices: a choice's values as gin text.
      where: 'file, line N', for messages.
    """

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    step: float | int | None = None
    choices: tuple[str, ...] = ()
    where: str = ""

    def distribution(self):
        """The Optuna distribution of this dimension."""
        import optuna

        d = optuna.distributions
        if self.kind == "choice":
            return d.CategoricalDistribution(self.choices)
        if self.kind in ("int", "logint"):
            return d.IntDistribution(int(self.low), int(self.high), log=self.kind == "logint", step=int(self.step or 1))
        return d.FloatDistribution(float(self.low), float(self.high), log=self.kind == "loguniform",
                                   step=None if self.step is None else float(self.step))

    def binding(self, value) -> str:
        """The gin binding of one sampled value."""
        text = value if self.kind == "choice" else repr(int(value) if self.kind in ("int", "logint") else float(value))
        return f"{self.name} = {text}"


@dataclasses.dataclass(frozen=True)
class Space:
    """The dimensions searched, and the bindings every trial shares."""

    dimensions: tuple[Dimension, ...]
    fixed: tuple[str, ...] = ()  # 'name = value' bindings
    source: str = ""  # the file's text
    path: str = ""

    def distributions(self) -> dict:
        return {d.name: d.distribution() for d in self.dimensions}

    def bindings(self, params: dict) -> list[str]:
        """Every binding of one trial: the fixed ones, then the sampled ``params``."""
        return [*self.fixed, *(d.binding(params[d.name]) for d in self.dimensions)]

    def corners(self) -> list[list[str]]:
        """Bindings that reach every value a dimension can take at its ends (each choice once,
        each range's low and high): checked against gin before the first trial starts."""
        out = []
        width = max([len(d.choices) if d.kind == "choice" else 2 for d in self.dimensions] + [1])
        for i in range(width):
            params = {}
            for d in self.dimensions:
                if d.kind == "choice":
                    params[d.name] = d.choices[i % len(d.choices)]
                else:
                    params[d.name] = d.low if i % 2 == 0 else d.high
            out.append(self.bindings(params))
        return out


def read(path: str) -> Space:
    """The search space in ``path`` (.yaml/.yml: YAML; anything else: gin-style ``name = value``).

    Raises:
      SegtrainError: a missing file, or an entry that is not a binding or a valid distribution,
        naming the file and line.
    """
    if not os.path.isfile(path):
        raise SegtrainError(f"--space={path}: no such file.")
    text = open(path, encoding="utf-8").read()
    entries = _yaml_entries(path, text) if path.endswith((".yaml", ".yml")) else _gin_entries(path, text)
    if not entries:
        raise SegtrainError(f"--space={path} names no binding to search: write one per line, e.g. "
                            f"'learning_rate.base: loguniform(1e-4, 1e-2)'.")
    dimensions, fixed, seen = [], [], set()
    for name, value, where in entries:
        if not _NAME.match(name):
            raise SegtrainError(f"{where}: {name!r} is not a gin binding name (e.g. learning_rate.base).")
        if name in seen:
            raise SegtrainError(f"{where}: {name} is named twice in the search space.")
        seen.add(name)
        dimension = parse_value(name, value, where)
        if dimension is None:
            fixed.append(f"{name} = {value}")
        else:
            dimensions.append(dimension)
    if not dimensions:
        raise SegtrainError(f"--space={path} has only fixed values: give at least one distribution, e.g. "
                            f"'learning_rate.base: loguniform(1e-4, 1e-2)'.")
    return Space(tuple(dimensions), tuple(fixed), text, path)


def parse_value(name: str, text: str, where: str = "") -> Dimension | None:
    """The dimension of ``text`` (a distribution), or None when it is a fixed gin value."""
    match = re.fullmatch(r"\s*(uniform|loguniform|int|logint|choice)\s*\((.*)\)\s*", text, re.S)
    if not match:
        return None
    kind, inner = match.groups()
    args, kwargs = [], {}
    for part in _split(inner, where):
        key = re.match(r"\s*(\w+)\s*=(?!=)\s*(.*)$", part, re.S)
        if key and kind != "choice":
            kwargs[key.group(1)] = key.group(2).strip()
        else:
            args.append(part.strip())
    usage = f"{where}: {name}: {text.strip()}"
    if kind == "choice":
        if len(args) < 2:
            raise SegtrainError(f"{usage}: choice() needs two values or more (one value is a fixed binding).")
        if len(set(args)) != len(args):
            raise SegtrainError(f"{usage}: choice() lists a value twice.")
        return Dimension(name, kind, choices=tuple(args), where=where)
    unknown = set(kwargs) - {"step"}
    if len(args) != 2 or unknown:
        raise SegtrainError(f"{usage}: {kind}() takes (low, high" + (", step=s)" if kind in ("uniform", "int") else ")")
                            + (f", not {', '.join(sorted(unknown))}" if unknown else "") + ".")
    low, high = (_number(a, usage) for a in args)
    step = _number(kwargs["step"], usage) if "step" in kwargs else None
    if step is not None and kind not in ("uniform", "int"):
        raise SegtrainError(f"{usage}: {kind}() takes no step (a log scale has none).")
    if kind in ("int", "logint") and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise SegtrainError(f"{usage}: {kind}() takes whole numbers.")
    if not low < high:
        raise SegtrainError(f"{usage}: low must be below high.")
    if kind.startswith("log") and low <= 0:
        raise SegtrainError(f"{usage}: a log scale needs low > 0.")
    if step is not None and step <= 0:
        raise SegtrainError(f"{usage}: step must be above 0.")
    return Dimension(name, kind, low, high, step, where=where)


def _number(text: str, usage: str):
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
        value = None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SegtrainError(f"{usage}: {text.strip()!r} is not a number.")
    return value


def _scan(text: str):
    """(character, bracket depth, inside quotes) of each character of ``text``; the depth and
    quoting before the character is read."""
    depth, quote = 0, None
    for ch in text:
        yield ch, depth, quote is not None
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1


def _balanced(text: str) -> bool:
    """Whether ``text`` closes every bracket and quote it opens."""
    *_, last = _scan(text + " ")
    return last[1] <= 0 and not last[2]


def _split(text: str, where: str) -> list[str]:
    """``text`` split at its top-level commas (not inside brackets or quotes)."""
    if not _balanced(text):
        raise SegtrainError(f"{where}: unbalanced quotes or brackets in ({text}).")
    parts, current = [], ""
    for ch, depth, quoted in _scan(text):
        if ch == "," and depth == 0 and not quoted:
            parts.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current)
    return [p for p in parts if p.strip()]


def _gin_entries(path: str, text: str) -> list[tuple[str, str, str]]:
    """(name, value, where) of ``name = value`` lines; a value continues while brackets are open."""
    entries, pending = [], None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = _strip_comment(line).strip()
        if pending is not None:
            name, value, where = pending
            value = f"{value} {stripped}"
            pending = (name, value, where)
        elif not stripped:
            continue
        else:
            match = re.match(r"^([^=]+?)\s*=\s*(.*)$", stripped)
            if not match:
                raise SegtrainError(f"{path}, line {number}: expected 'binding = value', got {stripped!r}.")
            pending = (match.group(1).strip(), match.group(2), f"{path}, line {number}")
        if _balanced(pending[1]):
            entries.append(pending)
            pending = None
    if pending is not None:
        raise SegtrainError(f"{pending[2]}: the value of {pending[0]} never closes its brackets.")
    return entries


def _yaml_entries(path: str, text: str) -> list[tuple[str, str, str]]:
    import yaml

    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SegtrainError(f"{path} is not valid YAML: {e}") from None
    if loaded is None:
        return []
    if not isinstance(loaded, dict):
        raise SegtrainError(f"{path}: expected 'binding: value' entries, one per line.")
    lines = {}
    for number, line in enumerate(text.splitlines(), 1):
        key = line.split(":", 1)[0].strip()
        lines.setdefault(key, number)
    out = []
    for name, value in loaded.items():
        where = f"{path}, line {lines.get(str(name), '?')}"
        if isinstance(value, (list, dict)):
            raise SegtrainError(f"{where}: {name}: write a choice as choice(a, b), a fixed value as gin text.")
        out.append((str(name), _yaml_value(value, where), where))
    return out


def _yaml_value(value, where: str) -> str:
    """A YAML value as gin text: a distribution, or gin text (a tuple, @reference, %macro, a quoted
    string) as written; YAML's own strings, numbers, booleans and null as gin writes them."""
    if isinstance(value, str):
        if parse_value("", value, where) is not None or value.lstrip()[:1] in ("@", "%", "(", "[", "{", "'", '"'):
            return value
        return repr(value)
    return "None" if value is None else repr(value)


def _strip_comment(line: str) -> str:
    for i, (ch, _, quoted) in enumerate(_scan(line)):
        if ch == "#" and not quoted:
            return line[:i]
    return line
