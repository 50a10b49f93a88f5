"""A run certified against several contracts: the `contracts` config key, a certificate section per contract,
counts only where the run evaluates the clause, and located errors for a contract that cannot be used."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from provetrain.cli import app
from provetrain.contract import bundled_contract_path, load_contract, sibling_bindings
from provetrain.errors import ConfigError, ContractError
from provetrain.train.certificate import ClauseLedger, load_contracts

runner = CliRunner()
FIVE = ["training-loop-v1", "optimizer-v1", "backward-pass-v1", "checkpoint-v1", "batch-v1"]


@pytest.fixture
def no_sibling_bindings(monkeypatch: pytest.MonkeyPatch) -> None:
    table: dict = {}
    monkeypatch.setattr(sibling_bindings, "SIBLING_BINDINGS", table)
    monkeypatch.setattr("provetrain.contract.registry.SIBLING_BINDINGS", table)


def test_train_writes_a_certificate_section_per_contract(tmp_path: Path, no_sibling_bindings: None) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(f"steps: 3\nbatch_size: 32\ncontracts: [{', '.join(FIVE)}]\n", encoding="utf-8")
    out = tmp_path / "out"
    result = runner.invoke(app, ["train", str(config), "--quiet", "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    certificate = json.loads((out / "certificate.json").read_text(encoding="utf-8"))
    sections = {s["name"]: s for s in certificate["contracts"]}
    assert list(sections) == FIVE
    for section in sections.values():
        assert section["source"] == "bundled"
        assert section["sha256"] and section["version"] == "1.0.0"
        assert section["summary"]["total"] == len(section["clauses"]) > 0
        assert {c["state"] for c in section["clauses"]} <= {"bound", "not applicable", "unbound"}
    seed = sections["training-loop-v1"]
    assert seed["summary"] | {"checked_at_run_time": 0} == {
        "total": 19, "bound": 19, "not_applicable": 0, "unbound": 0, "checked_at_run_time": 0
    }  # fmt: skip
    # the seed's section has the same counts as the legacy top-level clauses
    assert [(c["id"], c["checks"]) for c in seed["clauses"]] == [(c["id"], c["checks"]) for c in certificate["clauses"]]
    lr_checks = next(c["checks"] for c in seed["clauses"] if c["text"] == "lr > 0.0")
    assert lr_checks >= 3
    # optimizer-v1's `lr > 0.0` is the same check (carried by text): the same counts; its other clauses
    # are not evaluated at run time
    optimizer = sections["optimizer-v1"]["clauses"]
    for clause in optimizer:
        if clause["text"] == "lr > 0.0":
            assert (clause["carried_from"], clause["checks"]) == ("training-loop-v1", lr_checks)
        elif clause["carried_from"] is None:
            assert clause["checks"] is None
    assert sections["optimizer-v1"]["summary"]["checked_at_run_time"] == 5  # 3 x `lr > 0.0`, 2 x params
    # batch-v1's gradient clauses quote the seed's text but are not carried: no counts
    batch = {c["id"]: c for c in sections["batch-v1"]["clauses"]}
    assert batch["gradient_scaling.preconditions[2]"]["checks"] is None
    assert sections["optimizer-v1"]["warnings"][0].endswith("(did you mean 'Learning rate positive'?)")


def test_the_default_is_the_training_loop_contract_alone() -> None:
    ledger = ClauseLedger(load_contract())
    certificate = ledger.certificate(run={}, outcome="kept")
    assert [s["name"] for s in certificate["contracts"]] == ["training-loop-v1"]


def test_a_contract_given_twice_is_one_section(tmp_path: Path) -> None:
    copy = tmp_path / "optimizer-v1.yaml"
    copy.write_bytes(bundled_contract_path("optimizer-v1").read_bytes())
    loaded = load_contracts(["optimizer-v1", "optimizer-v1.yaml", copy, "training-loop-v1"])
    assert [c.name for c in loaded] == ["optimizer-v1", "training-loop-v1"]


def test_an_unknown_contract_in_the_config_is_located_at_its_entry(tmp_path: Path) -> None:
    from provetrain.train.config import load_config
    from provetrain.train.run import prepare_trainer

    config = tmp_path / "run.yaml"
    config.write_text("steps: 2\ncontracts:\n  - training-loop-v1\n  - optimiser-v1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        prepare_trainer(load_config(config))
    error = caught.value
    assert (error.key, error.line, error.column) == ("contracts[1]", 4, 5)
    assert re.search(r"'optimiser-v1' is neither a contract file nor a bundled contract.*optimizer-v1", str(error))


def test_a_broken_contract_in_the_config_exits_2_located_in_the_contract(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(bundled_contract_path().read_text(encoding="utf-8").replace("bound: 4", "bound: four"))
    config = tmp_path / "run.yaml"
    config.write_text(f"steps: 2\ncontracts: [training-loop-v1, {bad}]\n", encoding="utf-8")
    result = runner.invoke(app, ["train", str(config), "--quiet", "--output-dir", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: {config}:2:")
    assert f"key 'contracts[1]': the contract does not load: {bad}:71:12: key 'kani_harnesses[0].bound'" in (
        result.stderr.replace("\n", "")
    )
    assert not (tmp_path / "out").exists() and "Traceback" not in result.output


def test_contracts_must_name_at_least_one(tmp_path: Path) -> None:
    from provetrain.train.config import load_config

    config = tmp_path / "run.yaml"
    config.write_text("contracts: []\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml:1:12: key 'contracts'"):
        load_config(config)
    with pytest.raises(ContractError):
        load_contracts([tmp_path / "missing.yaml"])


def test_the_integrations_certify_against_the_contracts_they_are_given(no_sibling_bindings: None) -> None:
    import torch

    from provetrain.integrations._certify import StepCertifier
    from provetrain.ops.adam import AdamW

    optimizer = AdamW(torch.nn.Linear(2, 1).parameters(), lr=1e-3, clip_value=1.0)
    certifier = StepCertifier(optimizer, contracts=["training-loop-v1", "optimizer-v1"])
    sections = certifier.ledger.certificate(run={}, outcome="kept")["contracts"]
    assert [s["name"] for s in sections] == ["training-loop-v1", "optimizer-v1"]
    # the optimizer's constructor refused empty parameters: counted once, in both contracts
    params = [c["checks"] for s in sections for c in s["clauses"] if c["text"] == "!params.is_empty()"]
    assert params == [1, 1, 1]


@pytest.mark.parametrize("module", ["lightning", "hf"])
def test_the_framework_callbacks_load_their_contracts_eagerly(module: str) -> None:
    pytest.importorskip("lightning" if module == "lightning" else "transformers")
    if module == "lightning":
        from provetrain.integrations.lightning import ProvetrainCallback as Callback
    else:
        from provetrain.integrations.hf import ProvetrainTrainerCallback as Callback
    assert [c.name for c in Callback(contracts=["optimizer-v1"]).contracts] == ["optimizer-v1"]
    with pytest.raises(ContractError, match="optimiser-v1: cannot read the contract file"):
        Callback(contracts=["optimiser-v1"])


def test_verify_takes_contracts_and_summarises_each(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from provetrain.verify import suite

    seen: dict = {}

    def one_check(model, inputs, *, thorough=False, contracts=(), gradient_samples=3):  # the suite's signature, stubbed
        seen["contracts"] = [c.name for c in contracts]
        return [suite.CheckResult("FALSIFY-TRAIN-001", "clip", "falsification", "pass", "stub", 0.0)]

    monkeypatch.setattr(suite, "run_verification", one_check)
    result = runner.invoke(app, ["verify", "--contract", "training-loop-v1", "--contract", "optimizer-v1"])
    assert result.exit_code == 0, result.output
    assert seen["contracts"] == ["training-loop-v1", "optimizer-v1"]
    assert "training-loop-v1: 19 of 19 clauses bound." in result.stdout
    assert re.search(r"^optimizer-v1: \d+ of 33 clauses bound\.", result.stdout, re.M)
    bad = tmp_path / "bad.yaml"
    bad.write_text(bundled_contract_path().read_text(encoding="utf-8").replace("bound: 4", "bound: four"))
    refused = runner.invoke(app, ["verify", "--contract", str(bad)])
    assert refused.exit_code == 2 and f"error: {bad}:71:12:" in refused.stderr
