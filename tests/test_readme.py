"""The README's two set-up commands are what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_section = readme.split("\n## ", 2)[1]
    assert first_section.startswith("Set up on a fresh machine")
    install, test = _setup_commands()
    assert install.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert test == "pytest"


def test_ci_installs_and_tests_exactly_as_the_readme_says() -> None:
    install, test = _setup_commands()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    steps = install.split(" && ")
    pip_steps = " && ".join(s for s in steps if s.startswith("pip install"))
    main_job = steps[-1]
    assert f"\n{pip_steps}\n" in ci
    assert f"\n{test} || status=$?\n" in ci
    assert f"\n{main_job}\n" in ci
