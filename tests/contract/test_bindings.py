"""The registry cannot drift from the code and the tests it names.

Every enforcement site must import; every pytest node id named as evidence must exist; every test marked
``@pytest.mark.contract(ID)`` must be listed as evidence for that id, and vice versa.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.contract import bundled_contract_names, enumerate_clauses, load_contract
from provetrain.contract.registry import BINDINGS, THEOREMS, Binding, resolve_dotted
from provetrain.contract.sibling_bindings import SIBLING_BINDINGS, NotApplicable

ROOT = Path(__file__).resolve().parents[2]


def _test_names(path: Path) -> set[str]:
    """``test_x`` and ``TestY::test_z`` node names defined in a test file."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def _contract_markers() -> dict[str, set[str]]:
    """Marker id -> node ids of the tests carrying ``@pytest.mark.contract(id)``."""
    marked: dict[str, set[str]] = defaultdict(set)
    for path in (ROOT / "tests").rglob("test_*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for decorator in node.decorator_list:
                if (
                    isinstance(decorator, ast.Call)
                    and ast.unparse(decorator.func) == "pytest.mark.contract"
                    and decorator.args
                    and isinstance(decorator.args[0], ast.Constant)
                ):
                    marked[decorator.args[0].value].add(f"{path.relative_to(ROOT).as_posix()}::{node.name}")
    return marked


def test_registry_is_not_empty() -> None:
    assert ENFORCEMENT_SITES and EVIDENCE


# Every binding of every contract: the seed's, and each sibling's (not-applicable entries bind nothing).
TABLES = {"training-loop-v1": BINDINGS, **SIBLING_BINDINGS}
ALL_BINDINGS = [(key, b) for table in TABLES.values() for key, b in table.items() if isinstance(b, Binding)]
ENFORCEMENT_SITES = sorted({site for _, b in ALL_BINDINGS for site in b.enforced_by})
EVIDENCE = sorted({(e.kind, e.ref) for b in (*(b for _, b in ALL_BINDINGS), *THEOREMS.values()) for e in b.evidence})


@pytest.mark.parametrize("site", ENFORCEMENT_SITES)
def test_enforcement_site_imports(site: str) -> None:
    assert callable(resolve_dotted(site))


@pytest.mark.parametrize(("kind", "ref"), EVIDENCE)
def test_evidence_exists(kind: str, ref: str) -> None:
    if ref.startswith("tests/"):
        file, _, name = ref.partition("::")
        assert (ROOT / file).exists(), f"evidence file {file} is missing"
        assert name.split("[")[0] in _test_names(ROOT / file), f"evidence test {ref} is missing"
    else:
        assert ref.startswith("provetrain "), f"evidence {ref!r} is neither a test node id nor a provetrain command"
        result = CliRunner().invoke(app, [*ref.split()[1:], "--help"])
        assert result.exit_code == 0, f"evidence command {ref!r} does not exist"


def test_marked_tests_and_registry_agree() -> None:
    marked = _contract_markers()
    listed: dict[str, set[str]] = defaultdict(set)
    for (_, kind, text), binding in ALL_BINDINGS:
        if kind in ("falsification", "harness"):
            listed[text] |= {e.ref for e in binding.evidence if e.ref.startswith("tests/")}
    for test_id, tests in marked.items():
        assert tests <= listed[test_id], (
            f"tests marked {test_id} but not listed as its evidence: {tests - listed[test_id]}"
        )
    for test_id, refs in listed.items():
        assert refs <= marked[test_id], (
            f"evidence for {test_id} not marked @pytest.mark.contract: {refs - marked[test_id]}"
        )


@pytest.mark.parametrize("name", sorted(TABLES))
def test_every_table_names_a_shipped_contract_and_only_its_clauses(name: str) -> None:
    """A key that names no clause would bind nothing (a renamed clause's stale entry); a not-applicable entry
    says why."""
    assert name in bundled_contract_names()
    keys = {clause.key for clause in enumerate_clauses(load_contract(name))}
    stale = set(TABLES[name]) - keys
    assert not stale, f"{name}: entries for clauses the contract does not have: {sorted(stale)}"
    for key, entry in TABLES[name].items():
        assert isinstance(entry, Binding | NotApplicable), key
        if isinstance(entry, NotApplicable):
            assert entry.reason.strip(), f"{name} {key}: not applicable without a reason"
