"""The contract as code: schema, located loading, clause enumeration, predicates and the registry."""

from provetrain.contract.clauses import Clause as Clause
from provetrain.contract.clauses import enumerate_clauses as enumerate_clauses
from provetrain.contract.lint import ContractWarning as ContractWarning
from provetrain.contract.load import LoadedContract as LoadedContract
from provetrain.contract.load import bundled_contract_names as bundled_contract_names
from provetrain.contract.load import bundled_contract_path as bundled_contract_path
from provetrain.contract.load import load_contract as load_contract
from provetrain.contract.load import load_contract_with_warnings as load_contract_with_warnings
from provetrain.contract.load import parse_contract as parse_contract
from provetrain.contract.load import parse_contract_with_warnings as parse_contract_with_warnings
from provetrain.contract.registry import Binding as Binding
from provetrain.contract.registry import ClauseStatus as ClauseStatus
from provetrain.contract.registry import Evidence as Evidence
from provetrain.contract.registry import NotApplicable as NotApplicable
from provetrain.contract.registry import TheoremBinding as TheoremBinding
from provetrain.contract.registry import TheoremStatus as TheoremStatus
from provetrain.contract.registry import bindings_for as bindings_for
from provetrain.contract.registry import clause_statuses as clause_statuses
from provetrain.contract.registry import theorem_statuses as theorem_statuses
from provetrain.contract.schema import Contract as Contract

__all__ = [
    "Binding",
    "Clause",
    "ClauseStatus",
    "Contract",
    "ContractWarning",
    "Evidence",
    "LoadedContract",
    "NotApplicable",
    "TheoremBinding",
    "TheoremStatus",
    "bindings_for",
    "bundled_contract_names",
    "bundled_contract_path",
    "clause_statuses",
    "enumerate_clauses",
    "load_contract",
    "load_contract_with_warnings",
    "parse_contract",
    "parse_contract_with_warnings",
    "theorem_statuses",
]
