"""``ghostrunner lab up|down|status``: a local MeshCentral sandbox to try GhostRunner
against, like ``temporal server start-dev``.

The lab itself is :mod:`ghostrunner.lab`; it is imported only when a ``lab`` command
runs, so the rest of the command never loads it.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from ghostrunner.lab import Agent, MeshLab

__all__ = ["add_lab_parser", "default_lab_dir"]

EXIT_OK, EXIT_NOT_UP = 0, 3

LAB_HELP = """\
A local MeshCentral sandbox to try GhostRunner against: a MeshCentral server on
127.0.0.1 with one device group and N local agents (devices), left running in the
background until 'ghostrunner lab down'.

  ghostrunner lab up [--agents N] [--dir DIR]
      start the lab (or reuse the one running in DIR), wait until its agents are
      connected, and print its URL, user, password, group id and node ids, with a
      ready-to-paste 'ghostrunner serve' command line
  ghostrunner lab status [--dir DIR]
      the server (pid, URL) and each agent (pid, connected or not); exit status 0 if
      the server runs and answers, 3 if not
  ghostrunner lab down [--dir DIR]
      stop the lab's agents and server, by the PIDs recorded in DIR

Needs Linux, Node.js (16+) and npm: MeshCentral is installed from npm into
~/.cache/ghostrunner on first use (about 30 s, once). Everything listens on 127.0.0.1
only. The admin password is generated for this sandbox and kept in DIR/lab.json
(mode 0600). DIR (default ~/.cache/ghostrunner/lab) keeps the lab between runs: the
same port, group and devices (node ids) after 'down' and 'up' again.
"""


def default_lab_dir() -> Path:
    """Where ``ghostrunner lab`` keeps its lab unless ``--dir`` says otherwise."""
    return Path.home() / ".cache" / "ghostrunner" / "lab"


def _agent_count(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 32:
        raise argparse.ArgumentTypeError("must be between 0 and 32")
    return value


def add_lab_parser(sub: Any) -> None:
    """Add the ``lab`` command to the ``ghostrunner`` subparsers ``sub``."""
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--dir", type=Path, default=None,
                       help=f"the lab's directory (default {default_lab_dir()})")
    lab = sub.add_parser("lab", help="a local MeshCentral sandbox: lab up|status|down",
                         description=LAB_HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    lsub = lab.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = lsub.add_parser("up", parents=[where],
                        help="start the lab (or reuse a running one) and print how to use it")
    p.add_argument("--agents", type=_agent_count, default=2, metavar="N",
                   help="agents to run, named agent-1..agent-N (default 2)")
    p.set_defaults(handler=cmd_lab_up)
    p = lsub.add_parser("status", parents=[where],
                        help="is the lab up? (exit status 0 if it is, 3 if not)")
    p.set_defaults(handler=cmd_lab_status)
    p = lsub.add_parser("down", parents=[where], help="stop the lab's agents and server")
    p.set_defaults(handler=cmd_lab_down)


# --------------------------------------------------------------------------- helpers


def _root(args: argparse.Namespace) -> Path:
    root: Path = args.dir if args.dir is not None else default_lab_dir()
    return root.expanduser().resolve()


def _progress(message: str) -> None:
    print(f"[lab] {message}", file=sys.stderr, flush=True)


def _fail(exc: Exception) -> int:
    print(f"ghostrunner lab: {exc}", file=sys.stderr)
    return EXIT_NOT_UP


def _dir_option(root: Path) -> str:
    if root == default_lab_dir().expanduser().resolve():
        return ""
    return f" --dir {shlex.quote(str(root))}"


def _open(root: Path, *, create: bool) -> MeshLab | None:
    """The lab in ``root`` (None if there is none and ``create`` is false)."""
    from ghostrunner.lab import MeshLab

    if not create and not (root / "lab.json").exists():
        return None
    return MeshLab(root, log=_progress if create else None)


def _serve_command(lab: MeshLab) -> str:
    settings = [
        ("URL", lab.url),
        ("USER", lab.admin_user),
        ("PASSWORD", lab.admin_password),
        ("IGNORE_SSL", "true"),  # the lab's certificate is self-signed
        ("GROUP_ID", lab.group_id),
    ]
    lines = [f"GHOSTRUNNER_MESHCENTRAL_{key}={shlex.quote(value)} \\" for key, value in settings]
    return "\n".join([*lines, "ghostrunner serve"])


def _print_connection(lab: MeshLab, out: TextIO) -> None:
    print(f"  web UI     {lab.https_url}  (self-signed certificate)", file=out)
    print(f"  url        {lab.url}", file=out)
    print(f"  user       {lab.admin_user}", file=out)
    print(f"  password   {lab.admin_password}  (generated for this sandbox, which listens "
          f"on 127.0.0.1 only)", file=out)
    print(f"  group id   {lab.group_id}", file=out)


def _agent_rows(agents: list[Agent], connected: set[str] | None) -> list[list[str]]:
    rows = [["AGENT", "PID", "STATE", "NODE ID"]]
    for agent in agents:
        node_id = agent.node_id if agent.enrolled else ""
        if not agent.running:
            state = "stopped"
        elif connected is None:
            state = "running"
        else:
            state = "connected" if node_id in connected else "running, not connected"
        rows.append([agent.name, str(agent.pid or "-"), state, node_id or "(not enrolled)"])
    return rows


def _table(rows: list[list[str]], out: TextIO, indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row, widths, strict=True)]
        print(indent + "  ".join(cells).rstrip(), file=out)


# --------------------------------------------------------------------------- commands


def cmd_lab_up(args: argparse.Namespace, out: TextIO) -> int:
    from ghostrunner.lab import LabError

    root = _root(args)
    began = time.monotonic()
    try:
        lab = _open(root, create=True)
    except LabError as exc:
        return _fail(exc)
    assert lab is not None
    reused = False
    ran_before: set[str] = set()
    try:
        reused = lab.attach()
        ran_before = {agent.name for agent in lab.agents if agent.running}
        if not reused:
            lab.start()
        known = {agent.name: agent for agent in lab.agents}
        names = [f"agent-{i}" for i in range(1, args.agents + 1)]
        agents = [known.get(name) or lab.add_agent(name) for name in names]
        lab.start_agents(agents)
        lab.wait_connected(agents, timeout=60)
    except BaseException as exc:
        # Stop what this command started; leave running what ran before it.
        with contextlib.suppress(Exception):
            for agent in lab.agents:
                if agent.name not in ran_before:
                    agent.stop()
            if not reused:
                lab.stop()
        lab.detach()
        if isinstance(exc, LabError):
            return _fail(exc)
        raise
    lab.detach()  # keep it running after this command exits

    took = time.monotonic() - began
    how = f"already running, reused; {took:.1f} s" if reused else f"started in {took:.1f} s"
    print(f"MeshCentral lab is up ({how}): {lab.root}", file=out)
    _print_connection(lab, out)
    if agents:
        print(file=out)
        _table(_agent_rows(agents, lab.connected_node_ids()), out)
    print("\nPoint GhostRunner at it (the lab keeps running in the background):\n", file=out)
    print(_serve_command(lab), file=out)
    where = _dir_option(lab.root)
    print(f"\nSee it with 'ghostrunner lab status{where}', stop it with "
          f"'ghostrunner lab down{where}'.", file=out)
    return EXIT_OK


def cmd_lab_status(args: argparse.Namespace, out: TextIO) -> int:
    from ghostrunner.lab import LabError

    root = _root(args)
    try:
        lab = _open(root, create=False)
    except LabError as exc:
        return _fail(exc)
    if lab is None:
        print(f"no lab in {root} (start one with 'ghostrunner lab up{_dir_option(root)}')",
              file=out)
        return EXIT_NOT_UP
    try:
        running = lab.attach()
        connected: set[str] | None = None
        problem = ""
        if running:
            try:
                connected = lab.connected_node_ids()
            except LabError as exc:
                problem = str(exc).strip().splitlines()[0]
        up = connected is not None
        if up:
            print(f"lab {lab.root}: up", file=out)
            print(f"  server     pid {lab.pid}, MeshCentral {lab.version} on port {lab.port}",
                  file=out)
            _print_connection(lab, out)
        elif running:
            print(f"lab {lab.root}: down (the server, pid {lab.pid}, does not answer: "
                  f"{problem})", file=out)
        else:
            print(f"lab {lab.root}: down (the server is not running; "
                  f"'ghostrunner lab up{_dir_option(lab.root)}' starts it)", file=out)
        if lab.agents:
            print(file=out)
            _table(_agent_rows(lab.agents, connected), out)
        return EXIT_OK if up else EXIT_NOT_UP
    finally:
        lab.detach()  # looking must not stop anything


def cmd_lab_down(args: argparse.Namespace, out: TextIO) -> int:
    from ghostrunner.lab import LabError

    root = _root(args)
    try:
        lab = _open(root, create=False)
        if lab is None:
            print(f"no lab in {root}: nothing to stop", file=out)
            return EXIT_OK
        lab.attach()
        running = [(agent.name, agent.pid) for agent in lab.agents if agent.running]
        server = lab.pid
        lab.close()
    except LabError as exc:
        return _fail(exc)
    for name, pid in running:
        print(f"stopped agent {name} (pid {pid})", file=out)
    if server is not None:
        print(f"stopped MeshCentral (pid {server})", file=out)
    if not running and server is None:
        print(f"nothing was running in {root}", file=out)
    return EXIT_OK
