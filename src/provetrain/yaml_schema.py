"""Validate YAML against a pydantic model, with errors located by file, line, column and key.

The YAML is composed into a node tree first (so every key and value keeps its position), then walked once,
aliases followed, before anything is built from it. The walk rejects, each with a located error:

- more than :data:`NODE_BUDGET` nodes once aliases are expanded (a few hundred bytes of nested aliases,
  the "billion laughs" pattern, would otherwise expand to billions of nodes and take minutes or memory);
- an alias used inside its own anchor (a recursive structure) and complex (non-scalar) mapping keys;
- duplicate keys (which plain YAML loading would silently collapse);
- tags that build Python objects (``!!python/...``) or that PyYAML's safe loader does not know, and scalar
  values their tag cannot read (``2024-13-45`` as a date).

The data is then validated by the pydantic model, and a validation error's key path is walked back through
the node tree to find where it sits in the file. Used for contract files and training configurations alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from provetrain.errors import LocatedError

__all__ = [
    "NODE_BUDGET",
    "KeyPositions",
    "LocatedProblem",
    "YamlDocument",
    "dotted_key",
    "read_yaml_text",
    "validate_yaml",
    "validate_yaml_document",
    "validate_yaml_located",
]

Loc = tuple[str | int, ...]
Model = TypeVar("Model", bound=BaseModel)
# Dotted key path (``model_args.hidden[0]``) -> 1-based (line, column) of the key, or of the item in a list.
KeyPositions = dict[str, tuple[int, int]]

# Largest number of nodes a file may expand to, aliases followed. The bundled contract has 131 and a
# training config a few dozen; walking 10,000 nodes takes milliseconds.
NODE_BUDGET = 10_000
# Largest file read at all: the largest contract in the sample of the format is 25 KB, and a file of more than this
# cannot stay within the node budget except by long strings; refused before it is parsed (10 MB took 8 s
# to compose before the node budget refused it).
MAX_YAML_BYTES = 2 * 1024 * 1024
_TAG_PREFIX = "tag:yaml.org,2002:"


class LocatedProblem(ValueError):
    """Raised inside a model validator for a problem at a known key path (e.g. a dangling reference)."""

    def __init__(self, loc: Loc, problem: str, *, expected: str) -> None:
        self.loc = loc
        self.problem = problem
        self.expected = expected
        super().__init__(problem)


def read_yaml_text(path: Path, error: type[LocatedError], *, what: str) -> str:
    """The file's text, or ``error`` naming the path and why it cannot be read (or is too large to be one)."""
    try:
        if path.exists() and not path.is_file() and not path.is_dir():  # /dev/zero would be read forever
            raise error(
                f"the {what} is not a regular file (a device, pipe or socket)", path=path, expected="a YAML file"
            )
        size = path.stat().st_size if path.is_file() else 0
        if size > MAX_YAML_BYTES:
            raise error(
                f"the {what} is {size / 1e6:.1f} MB, too large to be one (the node budget, {NODE_BUDGET:,} nodes, "
                "would refuse it after parsing)",
                path=path,
                expected=f"a {what} of at most {MAX_YAML_BYTES // 2**20} MiB",
            )
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(
            f"cannot read the {what}: {exc.strerror or exc}", path=path, expected="a readable YAML file"
        ) from None
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text ({exc.reason})", path=path, expected="a UTF-8 YAML file") from None


def validate_yaml(
    text: str, model: type[Model], *, path: str | Path | None, error: type[LocatedError], empty_expected: str
) -> Model:
    """Parse ``text`` and validate it as ``model``; any problem raises ``error`` located in the file."""
    return validate_yaml_located(text, model, path=path, error=error, empty_expected=empty_expected)[0]


def validate_yaml_located(
    text: str, model: type[Model], *, path: str | Path | None, error: type[LocatedError], empty_expected: str
) -> tuple[Model, KeyPositions]:
    """:func:`validate_yaml`, plus where each key sits in the file, to locate problems found later (a data
    file that does not load, a model argument out of range)."""
    document = validate_yaml_document(text, model, path=path, error=error, empty_expected=empty_expected)
    return document.value, document.positions


@dataclass(frozen=True)
class YamlDocument(Generic[Model]):
    """A validated file with its node tree kept, to locate what is found after validation (a warning about
    an unknown key, a dangling reference) at the key or at its value.

    Attributes:
        value: the validated model.
        path: the file, or None for text that did not come from one.
        positions: dotted key path -> 1-based (line, column) of the key (of the item, in a list).
    """

    value: Model
    path: str | Path | None
    positions: KeyPositions
    root: yaml.Node

    def locate(self, loc: Loc, *, at_key: bool = True) -> tuple[int, int] | None:
        """1-based (line, column) of the key at ``loc`` (``at_key``) or of its value; the nearest enclosing
        node when ``loc`` is not in the file; None for an empty path."""
        if not loc:
            return None
        node, key_node = _find(self.root, loc, point_at_key=at_key)
        return _line_column((key_node or node).start_mark)


def validate_yaml_document(
    text: str, model: type[Model], *, path: str | Path | None, error: type[LocatedError], empty_expected: str
) -> YamlDocument[Model]:
    """:func:`validate_yaml`, keeping the node tree and key positions (:class:`YamlDocument`)."""
    root = _compose(text, path, error, empty_expected)
    positions = _NodeWalk(path, error).check(root)
    try:
        data = yaml.SafeLoader(text).construct_document(root)
    except yaml.MarkedYAMLError as exc:
        raise _yaml_error(exc, path, error) from None
    try:
        return YamlDocument(model.model_validate(data), path, positions, root)
    except ValidationError as exc:
        raise _located(exc, root, path, model, error) from None


def _compose(text: str, path: str | Path | None, error_type: type[LocatedError], empty_expected: str) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        raise _yaml_error(error, path, error_type) from None
    except yaml.YAMLError as error:
        raise error_type(f"invalid YAML: {error}", path=path, expected="well-formed YAML") from None
    except RecursionError:
        raise error_type(
            "invalid YAML: nested too deeply to read", path=path, expected="at most a few hundred levels of nesting"
        ) from None
    if root is None:
        raise error_type("the file is empty", path=path, expected=empty_expected)
    return root


def _yaml_error(error: yaml.MarkedYAMLError, path: str | Path | None, error_type: type[LocatedError]) -> LocatedError:
    mark = error.problem_mark or error.context_mark
    problem = f"invalid YAML: {error.problem or error.context}"
    return error_type(problem, path=path, **_position(mark), expected="well-formed YAML")


class _NodeWalk:
    """One walk over a composed node tree, aliases followed, that stops at the first problem.

    Every node visit counts against :data:`NODE_BUDGET`, so the walk itself is bounded: an alias bomb is
    rejected after ``NODE_BUDGET`` visits, never expanded.
    """

    def __init__(self, path: str | Path | None, error_type: type[LocatedError]) -> None:
        self.path = path
        self.error_type = error_type
        self.visits = 0
        self.open: set[int] = set()  # the collections on the path from the root to the current node
        self.positions: KeyPositions = {}
        self.scalars = yaml.SafeLoader("")

    def check(self, root: yaml.Node) -> KeyPositions:
        self._visit(root, ())
        return self.positions

    def _fail(self, problem: str, loc: Loc, mark: yaml.Mark, expected: str) -> NoReturn:
        raise self.error_type(
            problem, path=self.path, key=_dotted(loc) or None, expected=expected, **_position(mark)
        ) from None

    def _visit(self, node: yaml.Node, loc: Loc) -> None:
        self.visits += 1
        if self.visits > NODE_BUDGET:
            self._fail(
                f"more than {NODE_BUDGET:,} YAML nodes once aliases are expanded (the node budget; "
                "nested aliases multiply, as in a 'billion laughs' file)",
                loc,
                node.start_mark,
                expected=f"at most {NODE_BUDGET:,} nodes, aliases counted each time they are used",
            )
        self._check_tag(node, loc)
        if isinstance(node, yaml.ScalarNode):
            return
        if id(node) in self.open:
            self._fail(
                "recursive alias: an anchor is used inside its own value",
                loc,
                node.start_mark,
                expected="aliases that refer to a finished anchor",
            )
        self.open.add(id(node))
        if isinstance(node, yaml.MappingNode):
            self._visit_mapping(node, loc)
        else:
            for index, item in enumerate(node.value):
                self.positions.setdefault(_dotted((*loc, index)), _line_column(item.start_mark))
                self._visit(item, (*loc, index))
        self.open.discard(id(node))

    def _visit_mapping(self, node: yaml.MappingNode, loc: Loc) -> None:
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self._fail(
                    f"complex key: a {'mapping' if isinstance(key_node, yaml.MappingNode) else 'list'} "
                    "used as a mapping key",
                    loc,
                    key_node.start_mark,
                    expected="plain (scalar) keys",
                )
            self._visit(key_node, loc)
            key = key_node.value
            if key in seen:
                self._fail(
                    "duplicate key (YAML would silently keep only the last one)",
                    (*loc, key),
                    key_node.start_mark,
                    expected="each key once per mapping",
                )
            seen.add(key)
            self.positions.setdefault(_dotted((*loc, key)), _line_column(key_node.start_mark))
            self._visit(value_node, (*loc, key))

    def _check_tag(self, node: yaml.Node, loc: Loc) -> None:
        tag = node.tag
        shown = "!!" + tag.removeprefix(_TAG_PREFIX) if tag.startswith(_TAG_PREFIX) else tag
        if tag.startswith(_TAG_PREFIX + "python/"):
            self._fail(
                f"the tag {shown!r} builds a Python object; provetrain reads YAML as plain data and never "
                "constructs one",
                loc,
                node.start_mark,
                expected="plain values (strings, numbers, lists, mappings)",
            )
        if tag == _TAG_PREFIX + "merge":  # the `<<` key, resolved by the mapping that holds it
            return
        if tag not in yaml.SafeLoader.yaml_constructors:
            self._fail(f"unknown YAML tag {shown!r}", loc, node.start_mark, expected="plain values without tags")
        if isinstance(node, yaml.ScalarNode) and tag not in (_TAG_PREFIX + "str", _TAG_PREFIX + "null"):
            try:
                self.scalars.construct_object(node)
            except Exception as exc:  # PyYAML raises ValueError, KeyError, AttributeError... for a bad scalar
                reason = f" ({exc})" if type(exc) is ValueError else ""  # the others' messages say nothing useful
                self._fail(
                    f"{node.value!r} is not a valid {shown} value{reason}",
                    loc,
                    node.start_mark,
                    expected=f"a value of the type {shown}",
                )


def _located(
    error: ValidationError,
    root: yaml.Node,
    path: str | Path | None,
    model: type[BaseModel],
    error_type: type[LocatedError],
) -> LocatedError:
    """Turn the first pydantic error into a ContractError pointing into the YAML."""
    # An unknown key is usually a typo of a missing one: report it first.
    details = sorted(error.errors(include_url=False), key=lambda d: d["type"] != "extra_forbidden")
    first = details[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, LocatedProblem):
        loc, problem, expected = cause.loc, cause.problem, cause.expected
    else:
        loc, problem, expected = tuple(first["loc"]), _problem(first), _expected(first)
    if first["type"] == "extra_forbidden":
        expected = "one of the keys " + ", ".join(_keys_allowed_at(model, loc[:-1]))
    node, key_node = _find(root, loc, point_at_key=first["type"] == "extra_forbidden")
    if len(details) > 1:
        problem += f" ({len(details) - 1} more problem{'s' if len(details) > 2 else ''} after this one)"
    mark = (key_node or node).start_mark
    return error_type(problem, path=path, key=_dotted(loc) or None, expected=expected, **_position(mark))


def _find(root: yaml.Node, loc: Loc, *, point_at_key: bool) -> tuple[yaml.Node, yaml.Node | None]:
    """The deepest node on ``loc`` (and its key node, when the last step was a mapping key)."""
    node, key_node = root, None
    for step in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == step:
                    child, key_node = v, k
                    break
        elif isinstance(node, yaml.SequenceNode) and isinstance(step, int) and step < len(node.value):
            child, key_node = node.value[step], None
        if child is None:
            return node, None  # a missing key: point at the mapping that should hold it
        node = child
    return node, key_node if point_at_key else None


def _keys_allowed_at(root_model: type[BaseModel], loc: Loc) -> list[str]:
    """The field names the schema allows in the mapping at ``loc``."""
    model: Any = root_model
    for step in loc:
        if isinstance(model, type) and issubclass(model, BaseModel) and isinstance(step, str):
            model = model.model_fields[step].annotation
        elif get_origin(model) in (dict, list):
            model = get_args(model)[-1]
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _problem(detail: dict[str, Any]) -> str:
    kind = detail["type"]
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        return "unknown key"
    got = detail.get("input")
    return f"{detail['msg'].rstrip('.')}; got {type(got).__name__} {got!r}"[:300]


_EXPECTED_BY_TYPE = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "missing": "this key to be present",
    "activation_checkpointing": "'module_lists' or a non-empty list of submodule name patterns such as ['blocks.*']",
}


def _expected(detail: dict[str, Any]) -> str:
    kind = detail["type"]
    ctx = detail.get("ctx") or {}
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal"):
        sign = ">" if kind == "greater_than" else ">="
        return f"a number {sign} {ctx.get('gt', ctx.get('ge'))}"
    if kind in ("less_than", "less_than_equal"):
        sign = "<" if kind == "less_than" else "<="
        return f"a number {sign} {ctx.get('lt', ctx.get('le'))}"
    if kind in ("string_too_short", "too_short"):
        return "a non-empty value"
    if kind == "value_error":
        return "a non-empty clause"
    return _EXPECTED_BY_TYPE.get(kind, detail["msg"])


def dotted_key(loc: Loc) -> str:
    """``("equations", "f", "preconditions", 0)`` -> ``equations.f.preconditions[0]``."""
    return _dotted(loc)


def _dotted(loc: Loc) -> str:
    text = ""
    for step in loc:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


def _line_column(mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1, mark.column + 1


def _position(mark: yaml.Mark | None) -> dict[str, int]:
    return {} if mark is None else {"line": mark.line + 1, "column": mark.column + 1}
