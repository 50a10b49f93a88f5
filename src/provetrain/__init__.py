"""provetrain: PyTorch training governed by a machine-checked contract."""

from provetrain.errors import ContractError as ContractError
from provetrain.errors import ContractViolation as ContractViolation

__all__ = ["ContractError", "ContractViolation"]
__version__ = "0.1.0"
