"""The sibling binding table cannot drift from the contracts, the code and the tests it names.

Every key is a clause of its contract (owner, kind and text exactly as ``enumerate_clauses`` derives them);
every enforcement site imports; every evidence test exists; the tests marked ``@pytest.mark.contract(ID)``
for a sibling id are exactly the evidence listed for it; and the registry reports each entry.
"""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.contract.bindings import Binding
from provetrain.contract.clauses import enumerate_clauses
from provetrain.contract.load import load_contract
from provetrain.contract.registry import clause_statuses, resolve_dotted
from provetrain.contract.sibling_bindings import SIBLING_BINDINGS, NotApplicable
from tests.contract.test_bindings import ROOT, _contract_markers, _test_names

STEMS = ["optimizer-v1", "backward-pass-v1", "checkpoint-v1", "batch-v1"]
ENTRIES = [(stem, key, entry) for stem in STEMS for key, entry in SIBLING_BINDINGS[stem].items()]
BINDINGS = [(stem, key, entry) for stem, key, entry in ENTRIES if isinstance(entry, Binding)]


def test_the_table_covers_exactly_the_four_training_siblings() -> None:
    assert sorted(SIBLING_BINDINGS) == sorted(STEMS)
    assert all(isinstance(entry, Binding | NotApplicable) for _, _, entry in ENTRIES)


@pytest.mark.parametrize("stem", STEMS)
def test_every_key_is_a_clause_of_its_contract(stem: str) -> None:
    clauses = {clause.key for clause in enumerate_clauses(load_contract(stem))}
    unknown = set(SIBLING_BINDINGS[stem]) - clauses
    assert not unknown, f"{stem}: keys that are no clause of the contract: {sorted(unknown)}"


@pytest.mark.parametrize("site", sorted({site for _, _, b in BINDINGS for site in b.enforced_by}))
def test_enforcement_site_imports(site: str) -> None:
    assert callable(resolve_dotted(site))


@pytest.mark.parametrize(("kind", "ref"), sorted({(e.kind, e.ref) for _, _, b in BINDINGS for e in b.evidence}))
def test_evidence_exists(kind: str, ref: str) -> None:
    if ref.startswith("tests/"):
        file, _, name = ref.partition("::")
        assert (ROOT / file).exists(), f"evidence file {file} is missing"
        assert name.split("[")[0] in _test_names(ROOT / file), f"evidence test {ref} is missing"
    else:
        assert ref.startswith("provetrain "), f"evidence {ref!r} is neither a test node id nor a provetrain command"
        assert CliRunner().invoke(app, [*ref.split()[1:], "--help"]).exit_code == 0


def test_every_binding_is_complete_and_every_not_applicable_says_why() -> None:
    for stem, (owner, kind, text), entry in ENTRIES:
        where = f"{stem} {owner}/{kind}: {text}"
        if isinstance(entry, NotApplicable):
            assert len(entry.reason) > 40, f"{where}: a not-applicable needs its reason"
            assert kind not in ("falsification", "obligation"), f"{where}: carried out here or a gap, never n/a"
            continue
        assert entry.evidence, f"{where}: a binding without evidence"
        if kind in ("precondition", "postcondition", "invariant", "obligation"):
            assert entry.enforced_by, f"{where}: a binding without the code that enforces it"


def test_marked_sibling_tests_and_the_table_agree() -> None:
    """Each falsification and harness id of the siblings: the tests marked with it are exactly its evidence."""
    marked = _contract_markers()
    listed: dict[str, set[str]] = defaultdict(set)
    for _, (_, kind, text), entry in BINDINGS:
        if kind in ("falsification", "harness"):
            listed[text] |= {e.ref for e in entry.evidence if e.ref.startswith("tests/")}
    ids = {text for _, (_, kind, text), _ in ENTRIES if kind in ("falsification", "harness")}
    ours = {i for i in marked if i.startswith(("FALSIFY-OPT", "FALSIFY-BACKWARD", "FALSIFY-CKPT", "FALSIFY-BATCH"))}
    for test_id in ids | ours | {"opt-kani-001", "ckpt-kani-001", "batch-kani-001"}:
        assert marked.get(test_id, set()) == listed[test_id], test_id


def test_the_registry_reports_each_entry_for_its_contract() -> None:
    for stem in STEMS:
        statuses = {s.clause.key: s for s in clause_statuses(load_contract(stem), name=stem)}
        for key, entry in SIBLING_BINDINGS[stem].items():
            status = statuses[key]
            if isinstance(entry, NotApplicable):
                assert status.state == "not applicable" and status.not_applicable == entry.reason
            else:
                assert status.binding == entry and status.carried_from is None
                # a pre/postcondition also needs an executable predicate for its text; anything else is bound
                assert status.bound or status.gaps == ("no predicate for this clause text",), (stem, key)


def test_contract_status_shows_the_bindings() -> None:
    result = CliRunner().invoke(app, ["contract", "status", "optimizer-v1", "--json"])
    assert result.exit_code == 0, result.output
    by_id = {row["id"]: row for row in json.loads(result.stdout) if row["contract"] == "optimizer-v1"}
    assert "provetrain.ops.adam.AdamW" in by_id["proof_obligations[0]"]["enforced_by"]
    assert by_id["FALSIFY-OPT-001"]["state"] == "bound"
    assert any(
        e["ref"].endswith("test_falsify_opt_001_adamw_loss_decreases_over_100_steps_on_a_convex_quadratic")
        for e in by_id["FALSIFY-OPT-001"]["evidence"]
    )
