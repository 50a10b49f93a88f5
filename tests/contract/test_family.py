"""Contracts no one here wrote: entrenar's training family (shipped in the package) and a sample of the
provable-contracts library (test data). Every one loads; what is suspect in them is a located warning."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

import pytest

from provetrain import ContractError, load_contract
from provetrain.contract import bundled_contract_names, bundled_contract_path, load_contract_with_warnings

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "contracts" / "provable-contracts"
SAMPLE_FILES = sorted(SAMPLE.glob("*.yaml"))
FAMILY = [
    "backward-pass-v1",
    "batch-v1",
    "checkpoint-v1",
    "gemm-v1",
    "lora-v1",
    "matmul-v1",
    "optimizer-v1",
    "quantization-v1",
    "softmax-v1",
    "tokenizer-v1",
    "training-loop-v1",
]
# entrenar's harnesses that cite an obligation by a short name instead of its property, with the property
# the warning suggests.
DANGLING = {
    "backward-pass-v1": "Gradient norm bounded after clipping",
    "gemm-v1": "BF16 GEMM error bounded",
    "matmul-v1": "Backward gradient correct",
    "optimizer-v1": "Learning rate positive",
    "quantization-v1": "Quantized values in representable range",
    "softmax-v1": "Probability distribution",
    "tokenizer-v1": "Token IDs in range",
}


def _sha256_table(sources: Path) -> dict[str, str]:
    rows = re.findall(r"^\| `([^`]+\.yaml)` \| `([0-9a-f]{64})` \|$", sources.read_text(encoding="utf-8"), re.M)
    return dict(rows)


def test_the_whole_family_is_shipped_byte_identical_to_its_sources() -> None:
    assert bundled_contract_names() == FAMILY
    table = _sha256_table(bundled_contract_path().parent / "SOURCES.md")
    assert sorted(table) == [f"{name}.yaml" for name in FAMILY]
    for name in FAMILY:
        assert hashlib.sha256(bundled_contract_path(name).read_bytes()).hexdigest() == table[f"{name}.yaml"], name


@pytest.mark.parametrize("name", FAMILY)
def test_every_contract_of_the_family_loads(name: str) -> None:
    loaded = load_contract_with_warnings(name)
    assert loaded.name == name and loaded.contract.equations
    rules = [w.rule for w in loaded.warnings]
    if name in DANGLING:
        (warning,) = loaded.warnings
        assert (warning.rule, warning.key, warning.suggestion) == (
            "dangling-obligation",
            "kani_harnesses[0].obligation",
            DANGLING[name],
        )
        assert warning.path == str(bundled_contract_path(name)) and warning.line and warning.column
    else:
        assert rules == []


def test_the_sample_is_the_one_its_sources_name() -> None:
    table = _sha256_table(SAMPLE / "SOURCES.md")
    assert len(SAMPLE_FILES) >= 15
    assert sorted(table) == sorted([p.name for p in SAMPLE_FILES] + ["refused/kernel-fusion-v1.yaml"])
    for name, digest in table.items():
        assert hashlib.sha256((SAMPLE / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=[p.stem for p in SAMPLE_FILES])
def test_every_sampled_library_contract_loads(path: Path) -> None:
    loaded = load_contract_with_warnings(path)
    assert loaded.name == path.stem and loaded.contract.equations
    for warning in loaded.warnings:  # every warning is located in this file
        assert str(warning).startswith(f"{path}:{warning.line}:{warning.column}: warning [")


def test_the_tricky_parts_of_the_sample_are_read_as_the_format_means_them() -> None:
    softmax = load_contract(SAMPLE / "softmax-kernel-v1.yaml")
    assert {o.lean.status for o in softmax.proof_obligations if o.lean} == {"proved", "sorry"}
    assert softmax.verification_summary is not None and softmax.verification_summary.total_obligations > 0
    kv = load_contract(SAMPLE / "kv-cache-equivalence-v1.yaml")
    assert 1e-5 in [o.tolerance for o in kv.proof_obligations]  # written 1e-5: a YAML 1.2 float
    assert 0.0 in [o.tolerance for o in load_contract(SAMPLE / "backend-dispatch-v1.yaml").proof_obligations]
    adamw = load_contract_with_warnings(SAMPLE / "adamw-kernel-v1.yaml")
    assert adamw.contract.simd_dispatch["adamw"]["avx2"] == "adamw_step_avx2"
    assert [w.suggestion for w in adamw.warnings][:2] == ["Decoupled weight decay", "Second moment non-negative"]
    architecture = load_contract_with_warnings(SAMPLE / "architecture-requirements-v1.yaml")
    unknown = [w.key for w in architecture.warnings if w.rule == "unknown-key"]
    assert unknown == ["weight_roles", "role_sets", "constraint_matrix", "architectures"]
    assert set(architecture.contract.model_extra or {}) == set(unknown)
    rules = Counter(
        w.rule for w in load_contract_with_warnings(SAMPLE / "preprocessing-normalization-v1.yaml").warnings
    )
    assert rules["SCHEMA-006"] == 1


def test_a_file_the_formats_own_parser_refuses_is_refused_located() -> None:
    with pytest.raises(ContractError) as caught:
        load_contract(SAMPLE / "refused" / "kernel-fusion-v1.yaml")
    assert caught.value.key == "equations" and caught.value.line == 28
    assert "required key is missing" in str(caught.value)
