"""The YAML reader shared by contracts and configs: a node budget, and hostile YAML rejected with a location."""

from __future__ import annotations

import re

import pytest
from pydantic import BaseModel, ConfigDict

from provetrain.errors import ConfigError
from provetrain.yaml_schema import NODE_BUDGET, validate_yaml, validate_yaml_located


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "x"
    args: dict[str, object] = {}


def _read(text: str) -> Settings:
    return validate_yaml(text, Settings, path="c.yaml", error=ConfigError, empty_expected="settings")


def _alias_bomb(levels: int, width: int = 9) -> str:
    """The 'billion laughs' pattern: each level lists the previous one ``width`` times (width**levels nodes)."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "args:\n" + "".join(f"  {line}\n" for line in lines)


@pytest.mark.parametrize("levels", [5, 9, 12])
def test_an_alias_bomb_is_stopped_by_the_node_budget(levels: int) -> None:
    # 12 levels of 9 would be 2.8e11 nodes: the walk stops after NODE_BUDGET visits instead of expanding them.
    with pytest.raises(ConfigError, match=r"^c\.yaml:\d+:\d+: key 'args\.l\d[\[\]\d]*': more than 10,000 YAML nodes"):
        _read(_alias_bomb(levels))
    with pytest.raises(ConfigError, match="the node budget"):
        _read(_alias_bomb(levels))


def test_aliases_within_the_budget_are_read() -> None:
    settings = _read(_alias_bomb(3, width=3))
    assert settings.args["l2"] == [[["lol"] * 3] * 3] * 3


def test_the_budget_counts_plain_nodes_too() -> None:
    items = ", ".join(["1"] * NODE_BUDGET)
    with pytest.raises(ConfigError, match="node budget"):
        _read(f"args: {{big: [{items}]}}\n")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "args: &a {self: *a}\n",
            "c.yaml:1:7: key 'args.self': recursive alias: an anchor is used inside its own value",
        ),
        ("args: &a [*a]\n", "c.yaml:1:7: key 'args[0]': recursive alias"),
        ("? [a, b]\n: 1\n", "c.yaml:1:3: complex key: a list used as a mapping key"),
        ("args:\n  ? {a: 1}\n  : 1\n", "c.yaml:2:5: key 'args': complex key: a mapping used as a mapping key"),
        ("name: x\nname: y\n", "c.yaml:2:1: key 'name': duplicate key"),
        (
            "name: !!python/object/apply:os.system ['echo hi']\n",
            "c.yaml:1:7: key 'name': the tag '!!python/object/apply:os.system' builds a Python object",
        ),
        (
            "name: !!python/name:os.system\n",
            "c.yaml:1:7: key 'name': the tag '!!python/name:os.system' builds a Python object",
        ),
        ("name: !custom x\n", "c.yaml:1:7: key 'name': unknown YAML tag '!custom'"),
        (
            "args: {when: 2024-13-45}\n",
            "c.yaml:1:14: key 'args.when': '2024-13-45' is not a valid !!timestamp value (month must be in 1..12)",
        ),
        ("args: {flag: !!bool maybe}\n", "c.yaml:1:14: key 'args.flag': 'maybe' is not a valid !!bool value (expected"),
        ("name: !!str [1]\n", "c.yaml:1:7: invalid YAML: expected a scalar node, but found sequence"),
        ("name: [unclosed\n", "c.yaml:2:1: invalid YAML"),
        ("[" * 3000, "c.yaml: invalid YAML: nested too deeply to read"),
        ("# only a comment\n", "c.yaml: the file is empty (expected settings)"),
    ],
)
def test_hostile_yaml_gets_one_located_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="^" + re.escape(message)):
        _read(text)


def test_merge_keys_still_work() -> None:
    assert _read("args: {<<: {a: 1}, b: 2}\n").args == {"a": 1, "b": 2}


def test_positions_name_every_key_and_list_item() -> None:
    _, positions = validate_yaml_located(
        "name: n\nargs:\n  hidden: [3, 4]\n", Settings, path=None, error=ConfigError, empty_expected="settings"
    )
    assert positions == {
        "name": (1, 1),
        "args": (2, 1),
        "args.hidden": (3, 3),
        "args.hidden[0]": (3, 12),
        "args.hidden[1]": (3, 15),
    }
