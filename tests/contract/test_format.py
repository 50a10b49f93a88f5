"""The whole provable-contracts format: every field it defines is typed, unknown keys and dangling references
are located warnings (not errors), and what the format requires or types wrongly is still an error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provetrain import ContractError, load_contract, parse_contract
from provetrain.contract import bundled_contract_path
from provetrain.contract.load import (
    LoadedContract,
    bundled_contract_names,
    load_contract_with_warnings,
    parse_contract_with_warnings,
)

# Every field of the format's types.rs (crates/provable-contracts/src/schema/types.rs), once.
FULL = """\
metadata:
  version: "1.0.0"
  created: "2026-02-18"
  author: "Someone"
  description: "Every field of the format"
  references:
    - "Paper (2024)"
  depends_on:
    - "silu-kernel-v1"
equations:
  softmax:
    formula: "s(x)_i = exp(x_i) / sum exp(x_j)"
    domain: "x in R^n"
    codomain: "(0,1)^n"
    invariants:
      - "sum(output) = 1.0"
proof_obligations:
  - type: invariant
    property: "Output sums to 1"
    formal: "|sum(softmax(x)) - 1.0| < eps"
    tolerance: 1e-6
    applies_to: all
    lean:
      theorem: "Softmax.partition_of_unity"
      module: "ProvableContracts.Softmax"
      status: proved
      depends_on: ["Real.exp_pos"]
      mathlib_imports: ["Mathlib.Analysis.SpecialFunctions.Exp"]
      notes: "over the reals"
  - type: idempotency
    property: "Exact"
    tolerance: 0.0
    applies_to: degree
kernel_structure:
  phases:
    - name: max
      description: "find the max"
      invariant: "max is finite"
simd_dispatch:
  softmax:
    scalar: softmax_scalar
    avx2: softmax_avx2
enforcement:
  sums_to_one:
    description: "Output sums to one"
    check: "contract_tests::FALSIFY-SM-001"
    severity: "ERROR"
    reference: "paper"
falsification_tests:
  - id: FALSIFY-SM-001
    rule: "normalization"
    prediction: "sums to 1"
    if_fails: "missing max subtraction"
kani_harnesses:
  - id: KANI-SM-001
    obligation: "Output sums to 1"
    property: "sums to one for small n"
    bound: 8
    strategy: stub_float
    solver: cadical
    harness: verify_softmax_sum
qa_gate:
  id: F-SM-001
  name: "Softmax"
  description: "gate"
  checks: ["normalization"]
  pass_criteria: "all pass"
  falsification: "introduce a bug"
verification_summary:
  total_obligations: 2
  l2_property_tested: 2
  l3_kani_proved: 1
  l4_lean_proved: 1
  l4_sorry_count: 0
  l4_not_applicable: 1
"""


def test_every_field_of_the_format_loads_typed_and_without_warnings() -> None:
    loaded = parse_contract_with_warnings(FULL, path="full.yaml")
    assert loaded.warnings == ()
    contract = loaded.contract
    assert contract.metadata.depends_on == ["silu-kernel-v1"]
    assert contract.equations["softmax"].codomain == "(0,1)^n"
    first, second = contract.proof_obligations
    assert first.tolerance == 1e-6  # a YAML 1.2 float (no dot) PyYAML reads as a string
    assert (first.lean.status, first.lean.theorem) == ("proved", "Softmax.partition_of_unity")
    assert (second.type, second.tolerance, second.applies_to, second.formal) == ("idempotency", 0.0, "degree", None)
    assert contract.kernel_structure.phases[0].invariant == "max is finite"
    assert contract.simd_dispatch == {"softmax": {"scalar": "softmax_scalar", "avx2": "softmax_avx2"}}
    assert contract.enforcement["sums_to_one"].reference == "paper"
    assert contract.falsification_tests[0].test is None
    harness = contract.kani_harnesses[0]
    assert (harness.solver, harness.harness, harness.bound) == ("cadical", "verify_softmax_sum", 8)
    assert contract.qa_gate.checks == ["normalization"]
    assert contract.verification_summary.l4_not_applicable == 1


def test_the_format_minimum_loads() -> None:
    """What types.rs requires and nothing else (the format's own parser test's minimal contract)."""
    text = 'metadata:\n  version: "1.0.0"\n  description: "x"\n  references: ["p"]\n'
    text += 'equations:\n  f:\n    formula: "x"\n'
    loaded = parse_contract_with_warnings(text)
    assert (loaded.warnings, loaded.name, loaded.path) == ((), "contract", None)
    assert loaded.contract.equations["f"].domain is None


def _full(old: str, new: str) -> str:
    assert old in FULL, old
    return FULL.replace(old, new, 1)


# (name, text, key, line, column, message regex): still errors, located.
FORMAT_ERRORS = [
    (
        "lean status unknown",
        _full("status: proved", "status: done"),
        "proof_obligations[0].lean.status",
        26,
        15,
        r"got str 'done'.*expected one of 'proved', 'sorry'",
    ),
    (
        "summary count not an integer",
        _full("total_obligations: 2", "total_obligations: many"),
        "verification_summary.total_obligations",
        70,
        22,
        r"valid integer",
    ),
    (
        "tolerance not a number",
        _full("tolerance: 1e-6", "tolerance: tight"),
        "proof_obligations[0].tolerance",
        21,
        16,
        r"got str 'tight'",
    ),
    (
        "dispatch table not a mapping",
        _full("    scalar: softmax_scalar\n    avx2: softmax_avx2\n", "    - scalar\n"),
        "simd_dispatch.softmax",
        41,
        5,
        r"valid dictionary",
    ),
    (
        "phase without a name",
        _full("    - name: max\n      description", "    - description"),
        "kernel_structure.phases[0].name",
        36,
        7,
        r"required key is missing",
    ),
    ("qa gate without an id", _full("  id: F-SM-001\n", ""), "qa_gate.id", 63, 3, r"required key is missing"),
    (
        "equation without a formula",
        _full('    formula: "s(x)_i = exp(x_i) / sum exp(x_j)"\n', ""),
        "equations.softmax.formula",
        12,
        5,
        r"required key is missing",
    ),
    (
        "depends_on not a list",
        _full('  depends_on:\n    - "silu-kernel-v1"', '  depends_on: "silu-kernel-v1"'),
        "metadata.depends_on",
        8,
        15,
        r"valid list",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "key", "line", "column", "pattern"), FORMAT_ERRORS, ids=[row[0] for row in FORMAT_ERRORS]
)
def test_wrong_types_and_missing_required_keys_are_located_errors(
    name: str, text: str, key: str, line: int, column: int, pattern: str
) -> None:
    with pytest.raises(ContractError) as caught:
        parse_contract(text, path="bad.yaml")
    error = caught.value
    assert (error.key, error.line, error.column) == (key, line, column), str(error)
    assert re.search(pattern, str(error)), str(error)


def _seed(old: str, new: str) -> str:
    text = bundled_contract_path().read_text(encoding="utf-8")
    assert old in text, old
    return text.replace(old, new, 1)


# (name, text, rule, key, line, column, suggestion)
WARNINGS = [
    (
        "dangling obligation reference",
        _seed('obligation: "Gradient norm bounded after clipping"', 'obligation: "Gradient norm bounded"'),
        "dangling-obligation",
        "kani_harnesses[0].obligation",
        70,
        17,
        "Gradient norm bounded after clipping",
    ),
    (
        "misspelt section key",
        _seed('    preconditions:\n      - "lr > 0.0"', '    precondtions:\n      - "lr > 0.0"'),
        "unknown-key",
        "equations.loss_decrease.precondtions",
        14,
        5,
        "preconditions",
    ),
    (
        "unknown top-level section",
        _seed("kani_harnesses:", "provenance: {by: hand}\nkani_harnesses:"),
        "unknown-key",
        "provenance",
        68,
        1,
        None,
    ),
    (
        "no references",
        _seed('  references:\n    - "Kingma & Ba (2014) Adam: A Method for Stochastic Optimization"\n', ""),
        "SCHEMA-001",
        "metadata.references",
        2,
        3,
        None,
    ),
    ("harness without a bound", _seed("    bound: 4\n", ""), "SCHEMA-012", "kani_harnesses[0]", 69, 5, None),
    (
        "two obligations with one formal",
        _seed('"loss is not NaN or Inf at any training step"', '"|grad| ≤ clip_value after clip_grad_norm"'),
        "SCHEMA-006",
        "proof_obligations[1].formal",
        43,
        13,
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "rule", "key", "line", "column", "suggestion"), WARNINGS, ids=[row[0] for row in WARNINGS]
)
def test_what_loads_but_is_suspect_is_a_located_warning(
    name: str, text: str, rule: str, key: str, line: int, column: int, suggestion: str | None
) -> None:
    loaded = parse_contract_with_warnings(text, path="warn.yaml")
    (warning,) = loaded.warnings
    assert (warning.rule, warning.key, warning.line, warning.column) == (rule, key, line, column), str(warning)
    assert warning.suggestion == suggestion
    assert str(warning).startswith(f"warn.yaml:{line}:{column}: warning [{rule}]: key '{key}': ")
    if suggestion:
        assert str(warning).endswith(f"(did you mean {suggestion!r}?)")


def test_unknown_keys_are_kept() -> None:
    contract = parse_contract(_seed("kani_harnesses:", "provenance: {by: hand}\nkani_harnesses:"))
    assert contract.model_extra == {"provenance": {"by": "hand"}}


def test_the_seed_has_no_warnings() -> None:
    loaded = load_contract_with_warnings()
    assert (loaded.name, loaded.warnings) == ("training-loop-v1", ())
    assert loaded.path == bundled_contract_path()


def test_a_bundled_name_resolves_to_the_packaged_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert {"training-loop-v1", "optimizer-v1"} <= set(bundled_contract_names())
    for name in ("optimizer-v1", "optimizer-v1.yaml"):
        loaded = load_contract_with_warnings(name)
        assert isinstance(loaded, LoadedContract)
        assert (loaded.name, loaded.path) == ("optimizer-v1", bundled_contract_path("optimizer-v1"))
    assert load_contract("training-loop-v1") == load_contract()
    # a file of that name in the working directory wins over the bundled one
    (tmp_path / "optimizer-v1").write_text('metadata: {version: "1", description: d}\nequations: {f: {formula: x}}\n')
    assert list(load_contract("optimizer-v1").equations) == ["f"]


def test_an_unknown_name_lists_the_bundled_contracts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    expected = r"optimiser-v1: cannot read the contract file.*bundled contract: .*optimizer-v1"
    with pytest.raises(ContractError, match=expected):
        load_contract("optimiser-v1")
