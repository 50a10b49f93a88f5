"""Run outputs: the run directory is claimed by exactly one run; a certificate is written even on a full disk."""

from __future__ import annotations

import errno
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from provetrain.train import outputs
from provetrain.train.outputs import RunOutputs


def test_of_runs_given_one_directory_at_the_same_moment_exactly_one_proceeds(tmp_path: Path) -> None:
    directory, start = tmp_path / "run", threading.Barrier(8)
    claimed: list[RunOutputs] = []
    refused: list[str] = []

    def claim() -> None:
        start.wait()
        try:
            claimed.append(RunOutputs(directory))
        except FileExistsError as error:
            refused.append(str(error))

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(claimed), len(refused)) == (1, 7)
    assert all("already holds files" in r or "claimed by another run at the same moment" in r for r in refused)
    claimed[0].close()


def test_the_claim_is_the_exclusive_creation_of_metrics(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")  # another run won between its check and ours
    monkeypatch.setattr(outputs, "check_output_dir", lambda directory: None)
    with pytest.raises(FileExistsError, match="claimed by another run at the same moment"):
        RunOutputs(tmp_path / "run")


def test_an_output_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("a file")
    with pytest.raises(FileExistsError, match=r"output directory .*run is a file; choose another output_dir"):
        RunOutputs(tmp_path / "run")


def _full_disk_for(large: bool) -> Any:
    real = outputs.write_json

    def write_json(path: Path, value: Any) -> None:
        if "clauses" in value or large:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, value)

    return write_json


def test_a_full_disk_leaves_a_minimal_certificate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = RunOutputs(tmp_path / "run")
    certificate = {"contract": {"version": "1"}, "outcome": "kept", "run": {"steps": 3, "x": 1}, "clauses": []}
    monkeypatch.setattr(outputs, "write_json", _full_disk_for(large=False))
    run.write_certificate(certificate)
    written = json.loads(run.certificate_path.read_text())
    assert written["outcome"] == "kept" and written["run"] == {"steps": 3}
    assert written["minimal"].startswith("the full certificate could not be written: [Errno 28]")
    run.close()


def test_with_no_room_for_a_new_file_the_minimal_certificate_overwrites_the_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = RunOutputs(tmp_path / "run")
    run.write_certificate({"outcome": "failed: did not finish", "run": {}, "clauses": [{"id": "a" * 500}]})
    monkeypatch.setattr(outputs, "write_json", _full_disk_for(large=True))
    run.write_certificate({"outcome": "failed: OSError: disk full", "run": {"steps": 9}, "clauses": []})
    assert json.loads(run.certificate_path.read_text())["outcome"] == "failed: OSError: disk full"
    run.close()
