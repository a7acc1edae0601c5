"""The lab package without a MeshCentral: it imports on any system (its POSIX-only parts
are used only when called), the core never imports it, and ``ghostrunner lab`` answers
for a directory that holds no lab. (The lab itself: tests/integration/test_lab*.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ghostrunner.lab import MeshLab
from ghostrunner_http.cli import main

ROOT = Path(__file__).resolve().parents[2]

# What a system without fcntl, process groups and SIGKILL (Windows) looks like to Python.
NOT_POSIX = """
import os, signal, sys
sys.modules["fcntl"] = None  # "import fcntl" raises ImportError
del os.killpg
del signal.SIGKILL
"""


def run_python(code: str, cwd: Path) -> str:
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env, cwd=cwd
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_lab_imports_without_posix_and_refuses_to_run(tmp_path: Path) -> None:
    code = NOT_POSIX + """
import ghostrunner.lab as lab
from ghostrunner.lab._install import install_meshcentral
print(sorted(lab.__all__))
print(lab.node_id_from_hex("00" * 48))
for use in (lambda: lab.MeshLab("lab"), lambda: install_meshcentral(cache_dir="cache")):
    try:
        use()
    except lab.LabError as exc:
        print("LabError:", exc)
"""
    lines = run_python(code, tmp_path).splitlines()
    assert lines[0] == "['Agent', 'LabError', 'LabTimeoutError', 'MeshLab', 'node_id_from_hex']"
    assert lines[1] == "node//" + "A" * 64
    assert len(lines) == 4
    for line in lines[2:]:
        assert line.startswith("LabError: the MeshCentral lab needs a POSIX system")
        assert "fcntl" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # refused before touching disk


def test_core_and_http_layer_do_not_import_the_lab(tmp_path: Path) -> None:
    code = """
import sys
import ghostrunner, ghostrunner.testing, ghostrunner.sqlite, ghostrunner.meshcentral
import ghostrunner_http.app, ghostrunner_http.cli
ghostrunner_http.cli.build_parser()
print(sorted(m for m in sys.modules if m.startswith("ghostrunner.lab")))
"""
    assert run_python(code, tmp_path).strip() == "[]"


def test_lab_help_documents_the_three_actions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["lab", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for usage in ("ghostrunner lab up [--agents N] [--dir DIR]",
                  "ghostrunner lab status [--dir DIR]", "ghostrunner lab down [--dir DIR]"):
        assert usage in text


def test_status_and_down_of_a_directory_without_a_lab(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "nothing-here"
    assert main(["lab", "status", "--dir", str(empty)]) == 3
    assert f"no lab in {empty}" in capsys.readouterr().out
    assert main(["lab", "down", "--dir", str(empty)]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    assert not empty.exists()  # looking does not create a lab


def test_the_readiness_probe_closes_an_error_answer(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An HTTP error answer (404...) means the server is up; its socket is closed at
    once, not left to the cyclic collector (a ResourceWarning at a random later point,
    which failed an unrelated test's setup in CI)."""
    import io
    import urllib.error

    from ghostrunner.lab import _server

    body = io.BytesIO(b"not found")
    error = urllib.error.HTTPError("https://127.0.0.1/", 404, "Not Found", None, body)  # type: ignore[arg-type]

    class Opener:
        def open(self, *args: object, **kwargs: object) -> object:
            raise error

    monkeypatch.setattr(_server, "_loopback_opener", Opener)
    assert MeshLab(tmp_path)._answers() is True
    assert body.closed
