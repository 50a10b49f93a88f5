"""One public door: the names ``provetrain`` exports, pinned."""

from __future__ import annotations

import provetrain


def test_public_api_is_pinned() -> None:
    assert sorted(provetrain.__all__) == sorted(
        [
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
            "SGD",
            "TrainConfig",
            "TrainResult",
            "Trainer",
            "__version__",
            "clause_statuses",
            "clip_grad_norm_",
            "estimate_lr_max",
            "forward_parity",
            "load_config",
            "load_contract",
            "parse_contract",
        ]
    )


def test_every_exported_name_exists() -> None:
    for name in provetrain.__all__:
        assert getattr(provetrain, name) is not None


def test_package_ships_type_information() -> None:
    from importlib import resources

    assert resources.files("provetrain").joinpath("py.typed").is_file()
