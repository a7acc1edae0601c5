"""GhostRunner's developer tasks.

Run ``python3 noxfile.py`` for the checks CI runs (lint, types, layering, tests), or
``python3 noxfile.py -s demo`` for the main job. Running this file directly bootstraps
nox into ``.nox/_bootstrap`` when it is not installed, so a fresh machine needs only
Python 3.11+ (and Node 20 with npm for the MeshCentral lab).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

try:
    import nox
except ModuleNotFoundError:  # bootstrap: only when run as a script without nox
    if __name__ != "__main__":
        raise
    import subprocess
    import venv

    boot = HERE / ".nox" / "_bootstrap"
    python = boot / "bin" / "python"
    if not python.exists():
        print("bootstrapping nox into .nox/_bootstrap ...", file=sys.stderr)
        venv.create(boot, with_pip=True)
        subprocess.run(
            [python, "-m", "pip", "install", "--quiet", "nox>=2024.4"], check=True
        )
    os.execv(python, [str(python), __file__, *sys.argv[1:]])

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_venv = "yes"
nox.options.error_on_missing_interpreters = True

PACKAGES = ["ghostrunner", "ghostrunner_http"]
#: the browser tests (tests/browser) drive the OS's Chromium: Playwright's own browser
#: download is not reachable from the project's machines
CHROMIUM = Path(os.environ.get("GHOSTRUNNER_CHROMIUM", "/usr/bin/chromium"))


def _install(session: nox.Session, extras: str = "dev") -> None:
    session.install("--quiet", "--upgrade", "pip")
    session.install("--quiet", "-e", f".[{extras}]")


def _ensure_chromium(session: nox.Session) -> None:
    """Chromium for the browser tests: Debian's package, installed when missing and we
    are root (as in CI); otherwise stop, saying what to install."""
    if CHROMIUM.exists():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        session.log(f"{CHROMIUM} is missing: installing Debian's chromium package")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        session.run("apt-get", "update", "-qq", external=True, env=env)
        session.run("apt-get", "install", "-y", "-qq", "chromium", external=True, env=env)
        if CHROMIUM.exists():
            return
    session.error(
        f"the browser tests (tests/browser) need Chromium at {CHROMIUM}: install it "
        "(Debian/Ubuntu: sudo apt-get install -y chromium), or set GHOSTRUNNER_CHROMIUM "
        "to a Chromium executable"
    )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff, mypy --strict, and the import-layering contracts (import-linter)."""
    _install(session)
    session.run("ruff", "check", *PACKAGES, "tests", "benchmarks", "noxfile.py")
    session.run("mypy", *[f"--package={p}" for p in PACKAGES])
    session.run("lint-imports")


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite, including the real-MeshCentral integration tests (the
    lab installs MeshCentral from npm into ~/.cache/ghostrunner on first use) and the
    console's browser tests (Debian's Chromium, installed here when missing)."""
    _install(session)
    _ensure_chromium(session)
    session.run("pytest", *(session.posargs or ["-q"]))


@nox.session
def demo(session: nox.Session) -> None:
    """The main job: a real MeshCentral lab, a device that is offline, a queued command,
    the device coming online, and the run going from pending to succeeded."""
    _install(session, "test")
    session.run("python", "-m", "ghostrunner.demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks; each prints its figures and the targets they are held to
    (``bench_latency`` and ``bench_dispatch`` run the real MeshCentral lab;
    ``bench_postgres`` starts its own PostgreSQL with the ``pgserver`` wheel)."""
    _install(session)
    scripts = sorted((HERE / "benchmarks").glob("bench_*.py"))
    wanted = set(session.posargs)
    for script in scripts:
        if wanted and script.stem not in wanted:
            continue
        session.run("python", str(script))


if __name__ == "__main__":
    nox.main()
