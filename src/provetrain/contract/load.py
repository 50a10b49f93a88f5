"""Load a contract file into the typed schema, with errors located by file, line, column and key.

The YAML is composed into a node tree first (so every key and value keeps its position), checked for
duplicate keys (which plain YAML loading would silently collapse), then validated by the pydantic schema.
A validation error's key path is walked back through the node tree to find where it sits in the file.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from provetrain.contract.schema import Contract, DanglingReference
from provetrain.errors import ContractError

__all__ = ["BUNDLED_CONTRACT_NAME", "bundled_contract_path", "load_contract", "parse_contract"]

BUNDLED_CONTRACT_NAME = "training-loop-v1.yaml"

Loc = tuple[str | int, ...]


def bundled_contract_path() -> Path:
    """Path of the contract shipped inside the package (an identical copy of the user's file)."""
    return Path(str(resources.files("provetrain") / "contracts" / BUNDLED_CONTRACT_NAME))


def load_contract(path: str | Path | None = None) -> Contract:
    """Load and validate a contract file; the bundled ``training-loop-v1.yaml`` when ``path`` is None.

    Raises:
        ContractError: the file cannot be read, is not valid YAML, or does not fit the schema. The error
            names the file, the line and column, the offending key and what was expected.
    """
    path = bundled_contract_path() if path is None else Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ContractError(
            f"cannot read the contract file: {error.strerror or error}", path=path, expected="a readable YAML file"
        ) from None
    except UnicodeDecodeError as error:
        raise ContractError(f"not UTF-8 text ({error.reason})", path=path, expected="a UTF-8 YAML file") from None
    return parse_contract(text, path=path)


def parse_contract(text: str, *, path: str | Path | None = None) -> Contract:
    """Validate contract YAML given as text; ``path`` is only used to locate errors."""
    root = _compose(text, path)
    data = yaml.SafeLoader(text).construct_document(root)
    try:
        return Contract.model_validate(data)
    except ValidationError as error:
        raise _located(error, root, path) from None


def _compose(text: str, path: str | Path | None) -> yaml.Node:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        problem = f"invalid YAML: {error.problem or error.context}"
        raise ContractError(problem, path=path, **_position(mark), expected="well-formed YAML") from None
    except yaml.YAMLError as error:
        raise ContractError(f"invalid YAML: {error}", path=path, expected="well-formed YAML") from None
    if root is None:
        raise ContractError("the file is empty", path=path, expected="a mapping with metadata and equations")
    _reject_duplicate_keys(root, (), path)
    return root


def _reject_duplicate_keys(node: yaml.Node, loc: Loc, path: str | Path | None) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise ContractError(
                    "duplicate key (YAML would silently keep only the last one)",
                    path=path,
                    key=_dotted((*loc, key)),
                    expected="each key once per mapping",
                    **_position(key_node.start_mark),
                )
            seen.add(key)
            _reject_duplicate_keys(value_node, (*loc, key), path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _reject_duplicate_keys(item, (*loc, index), path)


def _located(error: ValidationError, root: yaml.Node, path: str | Path | None) -> ContractError:
    """Turn the first pydantic error into a ContractError pointing into the YAML."""
    # An unknown key is usually a typo of a missing one: report it first.
    details = sorted(error.errors(include_url=False), key=lambda d: d["type"] != "extra_forbidden")
    first = details[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, DanglingReference):
        loc, problem, expected = cause.loc, cause.problem, cause.expected
    else:
        loc, problem, expected = tuple(first["loc"]), _problem(first), _expected(first)
    if first["type"] == "extra_forbidden":
        expected = "one of the keys " + ", ".join(_keys_allowed_at(loc[:-1]))
    node, key_node = _find(root, loc, point_at_key=first["type"] == "extra_forbidden")
    if len(details) > 1:
        problem += f" ({len(details) - 1} more problem{'s' if len(details) > 2 else ''} after this one)"
    mark = (key_node or node).start_mark
    return ContractError(problem, path=path, key=_dotted(loc) or None, expected=expected, **_position(mark))


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


def _keys_allowed_at(loc: Loc) -> list[str]:
    """The field names the schema allows in the mapping at ``loc``."""
    model: Any = Contract
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
