"""Installing MeshCentral from the npm registry into a shared cache, once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Final

from ._common import LabError, LogFunc, _require_posix, _stderr_log

DEFAULT_VERSION: Final = "1.1.55"
"""The MeshCentral version the lab is tested with (pin it: behaviour changes between releases)."""

_INSTALL_MARKER: Final = ".ghostrunner-install-complete"


def default_cache_dir(version: str = DEFAULT_VERSION) -> Path:
    """Where :func:`install_meshcentral` puts MeshCentral ``version`` by default.

    ``$GHOSTRUNNER_LAB_CACHE`` when the variable is set (used as is: point it at a
    per-version directory if you switch versions; a different version there is simply
    reinstalled), else ``~/.cache/ghostrunner/meshcentral-<version>``.
    """
    env = os.environ.get("GHOSTRUNNER_LAB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ghostrunner" / f"meshcentral-{version}"


def _installed_version(cache: Path) -> str | None:
    try:
        data = json.loads((cache / "node_modules" / "meshcentral" / "package.json").read_text())
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, str) else None


def _install_complete(cache: Path, version: str) -> bool:
    marker = cache / _INSTALL_MARKER
    try:
        recorded = marker.read_text().strip()
    except OSError:
        return False
    return recorded == version and _installed_version(cache) == version


def install_meshcentral(
    version: str = DEFAULT_VERSION,
    cache_dir: Path | str | None = None,
    *,
    log: LogFunc | None = None,
) -> Path:
    """Install ``meshcentral@<version>`` (exact pin) with npm into a cache directory, once.

    The directory gets its own ``package.json`` so that npm does not walk up into a
    parent project. A marker file, written only after npm succeeded and the installed
    version was checked, makes later calls return at once; an interrupted install is
    simply redone. Concurrent callers (other processes, e.g. pytest-xdist workers) are
    serialised with an ``fcntl`` lock on ``<cache>/.install.lock``.

    Args:
        version: MeshCentral version to install.
        cache_dir: Target directory; default :func:`default_cache_dir`.
        log: Progress messages (the install takes ~30 s cold); default: stderr.

    Returns:
        The cache directory; the package is ``<cache>/node_modules/meshcentral``.

    Raises:
        LabError: npm is missing or the install failed, or this is not a POSIX system.
    """
    say = log or _stderr_log
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(version)
    if _install_complete(cache, version):
        return cache
    _require_posix()
    import fcntl  # POSIX only: imported here so that importing the lab works everywhere

    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _install_complete(cache, version):  # another process finished it meanwhile
            return cache
        npm = shutil.which("npm")
        if npm is None:
            raise LabError("npm not found on PATH: the MeshCentral lab needs Node.js and npm")
        (cache / _INSTALL_MARKER).unlink(missing_ok=True)
        package_json = {
            "name": "ghostrunner-meshcentral-lab",
            "version": "0.0.0",
            "private": True,
            "description": "MeshCentral installed by ghostrunner.lab",
        }
        (cache / "package.json").write_text(json.dumps(package_json, indent=2) + "\n")
        cmd = [
            npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--save-exact",
            f"meshcentral@{version}",
        ]  # fmt: skip
        say(f"installing meshcentral@{version} into {cache} (takes ~30 s)")
        started = time.monotonic()
        tail: list[str] = []
        with subprocess.Popen(
            cmd,
            cwd=cache,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as proc:
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.rstrip()
                if line:
                    say(f"npm: {line}")
                    tail = [*tail[-39:], line]
            rc = proc.wait()
        if rc != 0:
            output = "\n".join(tail)
            raise LabError(f"npm install meshcentral@{version} failed (exit {rc}):\n{output}")
        installed = _installed_version(cache)
        if installed != version:
            raise LabError(f"npm installed meshcentral {installed!r}, expected {version!r}")
        tmp = cache / f"{_INSTALL_MARKER}.tmp"
        tmp.write_text(version + "\n")
        tmp.replace(cache / _INSTALL_MARKER)
        say(f"meshcentral@{version} installed in {time.monotonic() - started:.1f} s")
    return cache
