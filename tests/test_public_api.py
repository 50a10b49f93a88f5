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
            "ContractWarning",
            "LoadedContract",
            "PeerFailureError",
            "SGD",
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
    )


def test_every_exported_name_exists() -> None:
    for name in provetrain.__all__:
        assert getattr(provetrain, name) is not None


def test_the_readme_lists_the_public_api() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Public API\n", 1)[1].split("\n## ", 1)[0]
    listed = {
        name for line in section.splitlines() if line.startswith(("- ", "  ")) for name in re.findall(r"`(\w+)`", line)
    }
    assert listed == set(provetrain.__all__) - {"__version__"}


def test_the_contract_family_is_reachable_from_the_top() -> None:
    """Today's contract-family API from the one public door (issue 14): warnings, several contracts."""
    loaded = provetrain.load_contract_with_warnings("optimizer-v1")
    assert isinstance(loaded, provetrain.LoadedContract) and loaded.name == "optimizer-v1"
    assert all(isinstance(w, provetrain.ContractWarning) for w in loaded.warnings)
    assert "training-loop-v1" in provetrain.bundled_contract_names()
    assert issubclass(provetrain.PeerFailureError, RuntimeError)
    assert callable(provetrain.SGD.observe_loss) and callable(provetrain.Adam.observe_loss)


def test_package_ships_type_information() -> None:
    from importlib import resources

    assert resources.files("provetrain").joinpath("py.typed").is_file()
