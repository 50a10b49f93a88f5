"""The loader: the shipped contract, and bad contracts located by file, line, column and key."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from provetrain import ContractError, load_contract, parse_contract
from provetrain.contract import bundled_contract_path

SHARED_CONTRACT = Path(__file__).resolve().parents[3] / "shared" / "contracts" / "training-loop-v1.yaml"
# sha256 of the user's training-loop-v1.yaml as delivered; a change to the shipped copy must be deliberate.
SHIPPED_SHA256 = "b0ae9a479d3bc53d88a12268abcded890599a8788195f7f7354b246adb1a9e4b"


def shipped_text() -> str:
    return bundled_contract_path().read_text(encoding="utf-8")


def test_shipped_contract_loads_with_every_section() -> None:
    contract = load_contract()
    assert contract.metadata.version == "1.0.0"
    assert list(contract.equations) == ["loss_decrease", "gradient_norm"]
    assert contract.equations["gradient_norm"].postconditions == [
        "grad_norm <= clip_value",
        "gradients.iter().all(|g| g.is_finite())",
    ]
    assert contract.equations["loss_decrease"].lean_theorem == "ProvableContracts.Theorems.CrossEntropy.NonNegativity"
    assert [o.type for o in contract.proof_obligations] == ["bound", "invariant", "equivalence"]
    assert contract.proof_obligations[2].tolerance == pytest.approx(1e-4)
    assert [t.id for t in contract.falsification_tests] == [f"FALSIFY-TRAIN-00{i}" for i in (1, 2, 3)]
    (harness,) = contract.kani_harnesses
    assert (harness.id, harness.bound, harness.strategy) == ("train-kani-001", 4, "stub_float")
    assert harness.obligation == contract.proof_obligations[0].property


@pytest.mark.skipif(not SHARED_CONTRACT.exists(), reason="the project's shared/ folder is not beside this checkout")
def test_shipped_contract_is_identical_to_the_users_file() -> None:
    assert bundled_contract_path().read_bytes() == SHARED_CONTRACT.read_bytes()


def test_shipped_contract_is_pinned() -> None:
    """Holds where shared/ is absent too (an installed package): the bundled bytes are the delivered ones."""
    assert hashlib.sha256(bundled_contract_path().read_bytes()).hexdigest() == SHIPPED_SHA256


def test_loading_a_path_equals_the_default(tmp_path: Path) -> None:
    copy = tmp_path / "contract.yaml"
    copy.write_text(shipped_text(), encoding="utf-8")
    assert load_contract(copy) == load_contract()


def _edit(old: str, new: str) -> str:
    text = shipped_text()
    assert old in text, f"fixture edit target {old!r} not in the shipped contract"
    return text.replace(old, new, 1)


# (name, contract text, key named in the error, line, column, regex the message must match)
BAD_CONTRACTS = [
    (
        "unclosed flow list",
        _edit('  version: "1.0.0"', "  version: [1.0.0"),
        None,
        3,
        10,
        r"invalid YAML: expected ',' or ']'",
    ),
    (
        "wrong type in a clause list",
        _edit('      - "lr > 0.0"', "      - 5"),
        "equations.loss_decrease.preconditions[0]",
        15,
        9,
        r"valid string.*got int 5.*expected a string",
    ),
    (
        "unknown strategy",
        _edit("strategy: stub_float", "strategy: magic"),
        "kani_harnesses[0].strategy",
        72,
        15,
        r"got str 'magic'.*expected one of 'stub_float'",
    ),
    (
        "bound is not an integer",
        _edit("bound: 4", "bound: four"),
        "kani_harnesses[0].bound",
        71,
        12,
        r"valid integer.*expected an integer",
    ),
    (
        "bound is zero",
        _edit("bound: 4", "bound: 0"),
        "kani_harnesses[0].bound",
        71,
        12,
        r"greater than or equal to 1",
    ),
    (
        "duplicate falsification id",
        _edit("  - id: FALSIFY-TRAIN-002", "  - id: FALSIFY-TRAIN-001"),
        "falsification_tests[1].id",
        57,
        9,
        r"duplicate id 'FALSIFY-TRAIN-001'",
    ),
    (
        "missing required key",
        _edit('    property: "Loss finite"\n', ""),
        "proof_obligations[1].property",
        41,
        5,
        r"required key is missing",
    ),
    (
        "missing required key of a falsification test",
        _edit('    if_fails: "clip_grad_norm not applied"\n', ""),
        "falsification_tests[0].if_fails",
        52,
        5,
        r"required key is missing",
    ),
    (
        "duplicate mapping key",
        _edit('  version: "1.0.0"', '  version: "1.0.0"\n  version: "2.0.0"'),
        "metadata.version",
        3,
        3,
        r"duplicate key",
    ),
    (
        "negative tolerance",
        _edit("tolerance: 1.0e-4", "tolerance: -1.0e-4"),
        "proof_obligations[2].tolerance",
        48,
        16,
        r"greater than or equal to 0.*expected a number >= 0",
    ),
    (
        "unknown obligation type",
        _edit("  - type: equivalence", "  - type: equality"),
        "proof_obligations[2].type",
        45,
        11,
        r"got str 'equality'",
    ),
    ("top level is a list", "- metadata\n- equations\n", None, 1, 1, r"expected a mapping"),
    (
        "empty clause",
        _edit('      - "lr > 0.0"', '      - "  "'),
        "equations.loss_decrease.preconditions[0]",
        15,
        9,
        r"the clause is blank.*expected a non-empty clause",
    ),
]


@pytest.mark.parametrize(
    ("name", "text", "key", "line", "column", "pattern"), BAD_CONTRACTS, ids=[c[0] for c in BAD_CONTRACTS]
)
def test_bad_contract_is_located(name: str, text: str, key: str | None, line: int, column: int, pattern: str) -> None:
    with pytest.raises(ContractError) as caught:
        parse_contract(text, path="bad.yaml")
    error = caught.value
    assert (error.path, error.key, error.line, error.column) == ("bad.yaml", key, line, column)
    assert re.search(pattern, str(error)), str(error)
    assert str(error).startswith(f"bad.yaml:{line}:{column}: ")


def test_empty_file_is_an_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ContractError, match=r"empty\.yaml: the file is empty"):
        load_contract(empty)


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ContractError, match=r"nope\.yaml: cannot read the contract file: No such file"):
        load_contract(tmp_path / "nope.yaml")


def test_binary_file_is_an_error(tmp_path: Path) -> None:
    binary = tmp_path / "weights.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(ContractError, match=r"not UTF-8 text"):
        load_contract(binary)
