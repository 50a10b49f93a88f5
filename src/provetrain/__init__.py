"""provetrain: PyTorch training governed by a machine-checked contract.

The public API, re-exported from the modules that implement it; ``tests/test_public_api.py`` pins it.
"""

from provetrain.contract import Clause as Clause
from provetrain.contract import ClauseStatus as ClauseStatus
from provetrain.contract import Contract as Contract
from provetrain.contract import clause_statuses as clause_statuses
from provetrain.contract import load_contract as load_contract
from provetrain.contract import parse_contract as parse_contract
from provetrain.errors import ContractError as ContractError
from provetrain.errors import ContractViolation as ContractViolation

__version__ = "0.1.0"

__all__ = [
    "Clause",
    "ClauseStatus",
    "Contract",
    "ContractError",
    "ContractViolation",
    "__version__",
    "clause_statuses",
    "load_contract",
    "parse_contract",
]
