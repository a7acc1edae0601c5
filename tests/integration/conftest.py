"""Fixtures for tests against a real MeshCentral lab (see ``ghostrunner.lab``).

Everything under ``tests/integration/`` is marked ``integration``. Nothing here skips
when Node.js is missing: CI must run these tests, so a missing prerequisite fails loudly.

- ``mesh_lab`` (session): one started :class:`~ghostrunner.lab.MeshLab` in a temporary
  directory, closed (no process left) at the end of the session. Tests may stop or
  restart its server; the next test gets it running again.
- ``agent_factory`` (function): ``agent_factory(name, *, start=False) -> Agent``. Agents
  are created once per session and reused by name (first enrolment costs ~1 s of CPU),
  so the same name is the same device, with the same node id, in every test. The
  returned agent has enrolled (``node_id`` is known). With ``start=False`` (default) it
  is stopped and the server shows it offline; with ``start=True`` it is running and the
  server shows it online. After each test every agent still running is stopped and the
  server has registered it as offline.
- ``guarded_lab`` (session): another started lab, with MeshCentral's anti-flapping
  guard on; no agent_factory for it (tests add and stop their own agents).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from ghostrunner.lab import Agent, MeshLab

_HERE = Path(__file__).parent
_log = logging.getLogger("ghostrunner.lab")



def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: runs against a real MeshCentral with real agents"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Called with every collected item of the session: mark only this directory's.
    for item in items:
        if item.path.is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)



class AgentFactory(Protocol):
    """Type of the ``agent_factory`` fixture."""

    def __call__(self, name: str, *, start: bool = False) -> Agent: ...


@pytest.fixture(scope="session")
def mesh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    """A started MeshCentral lab shared by the whole session."""
    lab = MeshLab(tmp_path_factory.mktemp("meshlab"), log=_log.info)
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def guarded_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshLab]:
    """A second lab, with MeshCentral's anti-flapping guard on (production behaviour):
    an agent that reconnects too often shows online but has its core cleared, so the
    commands sent to it are silently dropped. Tests add their own agents to it."""
    lab = MeshLab(tmp_path_factory.mktemp("guarded"), flap_guard=True, log=_log.info)
    try:
        lab.start()
        yield lab
    finally:
        lab.close()


@pytest.fixture(scope="session")
def _agent_pool(mesh_lab: MeshLab) -> dict[str, Agent]:
    return {}


@pytest.fixture
def agent_factory(mesh_lab: MeshLab, _agent_pool: dict[str, Agent]) -> Iterator[AgentFactory]:
    """Create or reuse (by name) an enrolled agent of ``mesh_lab``."""
    if not mesh_lab.running:  # a previous test stopped the server and failed
        mesh_lab.start()

    def factory(name: str, *, start: bool = False) -> Agent:
        agent = _agent_pool.get(name)
        if agent is None:
            agent = mesh_lab.add_agent(name)
            _agent_pool[name] = agent
        if not agent.enrolled:
            agent.start(wait=True)  # first enrolment: records agent.node_id
            if not start:
                agent.stop()
                mesh_lab.wait_connected([agent], connected=False)
        if start:
            agent.start()
            mesh_lab.wait_connected([agent])
        return agent

    yield factory

    left_running = [agent for agent in mesh_lab.agents if agent.running]
    for agent in left_running:
        agent.stop()
    if not mesh_lab.running:
        mesh_lab.start()
    if left_running:
        mesh_lab.wait_connected(left_running, connected=False)
