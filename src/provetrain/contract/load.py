"""Load a contract file into the typed schema, with errors located by file, line, column and key."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from provetrain.contract.schema import Contract
from provetrain.errors import ContractError
from provetrain.yaml_schema import read_yaml_text, validate_yaml

__all__ = ["BUNDLED_CONTRACT_NAME", "bundled_contract_path", "load_contract", "parse_contract"]

BUNDLED_CONTRACT_NAME = "training-loop-v1.yaml"


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
    return parse_contract(read_yaml_text(path, ContractError, what="contract file"), path=path)


def parse_contract(text: str, *, path: str | Path | None = None) -> Contract:
    """Validate contract YAML given as text; ``path`` is only used to locate errors."""
    return validate_yaml(
        text, Contract, path=path, error=ContractError, empty_expected="a mapping with metadata and equations"
    )
