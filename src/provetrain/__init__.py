"""provetrain: PyTorch training governed by a machine-checked contract.

The public API, re-exported from the modules that implement it; ``tests/test_public_api.py`` pins it.
"""

from provetrain.contract import Clause as Clause
from provetrain.contract import ClauseStatus as ClauseStatus
from provetrain.contract import Contract as Contract
from provetrain.contract import ContractWarning as ContractWarning
from provetrain.contract import LoadedContract as LoadedContract
from provetrain.contract import bundled_contract_names as bundled_contract_names
from provetrain.contract import clause_statuses as clause_statuses
from provetrain.contract import load_contract as load_contract
from provetrain.contract import load_contract_with_warnings as load_contract_with_warnings
from provetrain.contract import parse_contract as parse_contract
from provetrain.errors import ArgumentViolation as ArgumentViolation
from provetrain.errors import ConfigError as ConfigError
from provetrain.errors import ContractError as ContractError
from provetrain.errors import ContractViolation as ContractViolation
from provetrain.ops.adam import Adam as Adam
from provetrain.ops.adam import AdamW as AdamW
from provetrain.ops.clip import clip_grad_norm_ as clip_grad_norm_
from provetrain.ops.sgd import SGD as SGD
from provetrain.train.config import TrainConfig as TrainConfig
from provetrain.train.config import load_config as load_config
from provetrain.train.distributed import PeerFailureError as PeerFailureError
from provetrain.train.lr_max import estimate_lr_max as estimate_lr_max
from provetrain.train.trainer import Callback as Callback
from provetrain.train.trainer import Trainer as Trainer
from provetrain.train.trainer import TrainResult as TrainResult
from provetrain.verify.parity import forward_parity as forward_parity

__version__ = "0.1.0"

__all__ = [
    "SGD",
    "Adam",
    "AdamW",
    "ArgumentViolation",
    "Callback",
    "Clause",
    "ClauseStatus",
    "ConfigError",
    "Contract",
    "ContractError",
    "ContractViolation",
    "ContractWarning",
    "LoadedContract",
    "PeerFailureError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "__version__",
    "bundled_contract_names",
    "clause_statuses",
    "clip_grad_norm_",
    "estimate_lr_max",
    "forward_parity",
    "load_config",
    "load_contract",
    "load_contract_with_warnings",
    "parse_contract",
]
