"""Load a contract file into the typed schema, with errors located by file, line, column and key.

A contract is named by a path or by the name of a contract shipped in the package (``optimizer-v1``, with or
without ``.yaml``; an existing file of that name wins). :func:`load_contract` returns the contract;
:func:`load_contract_with_warnings` returns it with its located warnings (:mod:`provetrain.contract.lint`):
unknown keys and dangling references load, and are reported, not refused. Wrong types, malformed YAML and
missing required keys are :class:`~provetrain.errors.ContractError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from provetrain.contract.lint import ContractWarning, contract_warnings
from provetrain.contract.schema import Contract
from provetrain.errors import ContractError
from provetrain.yaml_schema import read_yaml_text, validate_yaml_document

__all__ = [
    "BUNDLED_CONTRACT_NAME",
    "DEFAULT_CONTRACTS",
    "LoadedContract",
    "bundled_contract_names",
    "bundled_contract_path",
    "load_contract",
    "load_contract_with_warnings",
    "parse_contract",
    "parse_contract_with_warnings",
    "resolve_contract_path",
]

BUNDLED_CONTRACT_NAME = "training-loop-v1.yaml"
DEFAULT_CONTRACTS: tuple[str, ...] = ("training-loop-v1",)


@dataclass(frozen=True)
class LoadedContract:
    """A contract with where it came from and its warnings.

    Attributes:
        contract: the validated contract.
        name: its stem (``optimizer-v1``): what bindings and certificate sections are keyed by.
        path: the file it was read from (None for text).
        warnings: located warnings, in file order; empty for a clean contract.
    """

    contract: Contract
    name: str
    path: Path | None
    warnings: tuple[ContractWarning, ...] = ()


def _contracts_folder() -> Path:
    return Path(str(resources.files("provetrain") / "contracts"))


def bundled_contract_path(name: str = BUNDLED_CONTRACT_NAME) -> Path:
    """Path of a contract shipped inside the package (byte-identical copies of their sources; see
    ``contracts/SOURCES.md``); the training-loop contract by default."""
    return _contracts_folder() / (name if name.endswith(".yaml") else f"{name}.yaml")


def bundled_contract_names() -> list[str]:
    """Stems of the contracts shipped inside the package, sorted."""
    return sorted(path.stem for path in _contracts_folder().glob("*.yaml"))


def resolve_contract_path(name_or_path: str | Path | None) -> Path:
    """The file a contract argument names: an existing file, else a bundled contract of that name, else the
    path as given (reading it then fails with a located error that lists the bundled names)."""
    if name_or_path is None:
        return bundled_contract_path()
    path = Path(name_or_path)
    if path.exists():
        return path
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in bundled_contract_names():
        return bundled_contract_path(stem)
    return path


def load_contract(path: str | Path | None = None) -> Contract:
    """Load and validate a contract; the bundled ``training-loop-v1.yaml`` when ``path`` is None.

    ``path`` is a file or a bundled contract's name (``optimizer-v1``). Warnings are dropped: use
    :func:`load_contract_with_warnings` to see them.

    Raises:
        ContractError: the file cannot be read, is not valid YAML, or does not fit the schema. The error
            names the file, the line and column, the offending key and what was expected.
    """
    return load_contract_with_warnings(path).contract


def load_contract_with_warnings(path: str | Path | None = None) -> LoadedContract:
    """:func:`load_contract`, with the contract's name, file and located warnings."""
    resolved = resolve_contract_path(path)
    try:
        text = read_yaml_text(resolved, ContractError, what="contract file")
    except ContractError as error:
        if not resolved.exists() and resolved.suffix in ("", ".yaml", ".yml"):
            names = ", ".join(bundled_contract_names())
            raise ContractError(
                error.problem, path=resolved, expected=f"a contract file, or a bundled contract: {names}"
            ) from None
        raise
    return parse_contract_with_warnings(text, path=resolved)


def parse_contract(text: str, *, path: str | Path | None = None) -> Contract:
    """Validate contract YAML given as text; ``path`` is only used to locate errors."""
    return parse_contract_with_warnings(text, path=path).contract


def parse_contract_with_warnings(text: str, *, path: str | Path | None = None) -> LoadedContract:
    """:func:`parse_contract`, with the located warnings; the name is the file's stem (``contract`` for text)."""
    document = validate_yaml_document(
        text, Contract, path=path, error=ContractError, empty_expected="a mapping with metadata and equations"
    )
    name = Path(path).name.removesuffix(".yaml").removesuffix(".yml") if path is not None else "contract"
    resolved = None if path is None else Path(path)
    return LoadedContract(document.value, name, resolved, tuple(contract_warnings(document)))
