"""Validate YAML against a pydantic model, with errors located by file, line, column and key.

The YAML is composed into a node tree first (so every key and value keeps its position), checked for
duplicate keys (which plain YAML loading would silently collapse), then validated by the pydantic model.
A validation error's key path is walked back through the node tree to find where it sits in the file.
Used for contract files and training configurations alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from provetrain.errors import LocatedError

__all__ = ["LocatedProblem", "read_yaml_text", "validate_yaml"]

Loc = tuple[str | int, ...]
Model = TypeVar("Model", bound=BaseModel)


class LocatedProblem(ValueError):
    """Raised inside a model validator for a problem at a known key path (e.g. a dangling reference)."""

    def __init__(self, loc: Loc, problem: str, *, expected: str) -> None:
        self.loc = loc
        self.problem = problem
        self.expected = expected
        super().__init__(problem)


def read_yaml_text(path: Path, error: type[LocatedError], *, what: str) -> str:
    """The file's text, or ``error`` naming the path and why it cannot be read."""
    try:
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
    root = _compose(text, path, error, empty_expected)
    data = yaml.SafeLoader(text).construct_document(root)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _located(exc, root, path, model, error) from None


def _compose(text: str, path: str | Path | None, error_type: type[LocatedError], empty_expected: str) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = f"invalid YAML: {error.problem or error.context}"
        raise error_type(problem, path=path, **_position(mark), expected="well-formed YAML") from None
    except yaml.YAMLError as error:
        raise error_type(f"invalid YAML: {error}", path=path, expected="well-formed YAML") from None
    if root is None:
        raise error_type("the file is empty", path=path, expected=empty_expected)
    _reject_duplicate_keys(root, (), path, error_type)
    return root


def _reject_duplicate_keys(node: yaml.Node, loc: Loc, path: str | Path | None, error_type: type[LocatedError]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise error_type(
                    "duplicate key (YAML would silently keep only the last one)",
                    path=path,
                    key=_dotted((*loc, key)),
                    expected="each key once per mapping",
                    **_position(key_node.start_mark),
                )
            seen.add(key)
            _reject_duplicate_keys(value_node, (*loc, key), path, error_type)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(item, (*loc, index), path, error_type)


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
}


def _expected(detail: dict[str, Any]) -> str:
    kind = detail["type"]
    ctx = detail.get("ctx") or {}
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind in ("greater_than", "greater_than_equal"):
        sign = ">" if kind == "greater_than" else ">="
        return f"a number {sign} {ctx.get('gt', ctx.get('ge'))}"
    if kind in ("string_too_short", "too_short"):
        return "a non-empty value"
    if kind == "value_error":
        return "a non-empty clause"
    return _EXPECTED_BY_TYPE.get(kind, detail["msg"])


def _dotted(loc: Loc) -> str:
    text = ""
    for step in loc:
        text += f"[{step}]" if isinstance(step, int) else (f".{step}" if text else str(step))
    return text


def _position(mark: yaml.Mark | None) -> dict[str, int]:
    return {} if mark is None else {"line": mark.line + 1, "column": mark.column + 1}
