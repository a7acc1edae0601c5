"""A real MeshCentral lab on the loopback interface: server, device group and agents.

The lab is what GhostRunner's integration tests, demo and benchmarks run against, and
what ``ghostrunner lab up|down|status`` starts for a user. It needs only Python 3.11+,
Node.js (16+, tested with 20) and ``npm`` on ``PATH``; MeshCentral itself is installed
from the npm registry on first use and cached (``~/.cache/ghostrunner``, or
``$GHOSTRUNNER_LAB_CACHE``).

It runs on Linux only (process groups, ``fcntl``, ``/proc``, the Linux x86-64 agent).
Importing it works everywhere; creating a :class:`MeshLab` elsewhere raises
:class:`LabError`. The core ``ghostrunner`` package never imports it.

Layout of a lab rooted at ``root``::

    root/
      lab.json               lab state: port, admin credentials, group id (mode 0600)
      server.pid             PID (= process group) of the running server
      meshcentral-data/      MeshCentral's data dir (config.json, NeDB files, certificates)
      meshcentral-files/     MeshCentral's files dir
      meshcentral.log        server output (appended on every start)
      group.msh              the device group's agent settings, as served by the server
      agents/NAME/           one directory per agent: meshagent, meshagent.msh,
                             meshagent.db (its identity), agent.log, nodeid, agent.pid

The server is pointed at ``root`` with ``--datapath`` plus ``settings.datapath`` /
``settings.filespath`` in ``config.json`` (``--datapath`` alone only moves
``config.json``). Every process runs in its own process group, bound to 127.0.0.1 only,
with proxy variables removed from its environment; :meth:`MeshLab.close` (also run at
interpreter exit) kills all of them, unless :meth:`MeshLab.detach` left them running
for a later :meth:`MeshLab.attach`.

Example::

    with MeshLab(tmp_path) as lab:
        a, b = lab.add_agent("alpha"), lab.add_agent("beta")
        lab.start_agents([a, b])
        lab.wait_connected([a, b])
        b.stop()
        lab.wait_connected([b], connected=False)

Modules: ``_install`` (MeshCentral from npm into the cache), ``_procs`` (process groups,
``/proc``), ``_agent`` (:class:`Agent`), ``_server`` (:class:`MeshLab`), ``_common``
(errors, helpers). This package deliberately uses the standard library only.
"""

from ._agent import Agent
from ._common import LabError, LabTimeoutError, node_id_from_hex
from ._server import MeshLab

__all__ = ["Agent", "LabError", "LabTimeoutError", "MeshLab", "node_id_from_hex"]
