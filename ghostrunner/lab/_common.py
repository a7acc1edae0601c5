"""What every part of the lab shares: errors, the POSIX check, small helpers.

Nothing here needs a POSIX system to be imported.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import secrets
import signal
import socket
import ssl
import string
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Final

LogFunc = Callable[[str], None]

_HEX_NODE_ID_RE: Final = re.compile(r"^[0-9A-Fa-f]{96}$")
_PROXY_VARS: Final = frozenset(
    {"http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
)


class LabError(RuntimeError):
    """The lab could not do what was asked (install, start, enrol, a meshctrl call...)."""


class LabTimeoutError(LabError, TimeoutError):
    """A lab operation did not reach the expected state in time."""


def _stderr_log(message: str) -> None:
    print(f"[meshlab] {message}", file=sys.stderr, flush=True)


def _quiet_log(message: str) -> None:
    del message


def _require_posix() -> None:
    """Raise :class:`LabError` unless this system has what the lab's process handling
    uses: ``fcntl``, process groups and signals (``os.killpg``, ``SIGKILL``) and ``/proc``.

    Importing the lab works everywhere; creating a lab or installing MeshCentral calls
    this first.
    """
    missing: list[str] = []
    try:
        import fcntl  # noqa: F401  (only whether it exists)
    except ImportError:
        missing.append("fcntl")
    if not hasattr(os, "killpg"):
        missing.append("os.killpg")
    if not hasattr(signal, "SIGKILL"):
        missing.append("signal.SIGKILL")
    if not os.path.isdir("/proc"):
        missing.append("/proc")
    if missing:
        raise LabError(
            f"the MeshCentral lab needs a POSIX system (Linux); this one ({sys.platform}) "
            f"lacks {', '.join(missing)}"
        )


def node_id_from_hex(hex_id: str) -> str:
    """Turn ``meshagent -nodeid`` output (96 hex digits) into MeshCentral's ``node//...`` id.

    MeshCentral's form is the base64 of the 48 bytes with ``+`` replaced by ``@`` and ``/``
    by ``$``.

    Raises:
        ValueError: ``hex_id`` is not 96 hex digits.
    """
    hex_id = hex_id.strip()
    if not _HEX_NODE_ID_RE.match(hex_id):
        raise ValueError(f"not a meshagent node id: {hex_id!r}")
    encoded = base64.b64encode(binascii.unhexlify(hex_id)).decode("ascii")
    return "node//" + encoded.replace("+", "@").replace("/", "$")


def _loopback_opener() -> urllib.request.OpenerDirector:
    """urllib opener for the lab server: no proxy, its self-signed certificate accepted."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _clean_env() -> dict[str, str]:
    # Everything in the lab talks to 127.0.0.1 only. A proxy variable would also make
    # MeshCentral npm-install https-proxy-agent at start-up (a network access).
    env = {k: v for k, v in os.environ.items() if k not in _PROXY_VARS}
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    tmp.replace(path)


def _random_password(length: int = 24) -> str:
    # Letters and digits only: the password goes on a command line that MeshCentral
    # parses with minimist (a leading "-" would be taken for an option).
    alphabet = string.ascii_letters + string.digits
    return "Lab" + "".join(secrets.choice(alphabet) for _ in range(length))
