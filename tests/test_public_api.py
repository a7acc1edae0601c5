"""The public API is what ``__all__`` says, no more and no less.

Modelled on httpx's ``tests/test_exported_members.py``: every exported name resolves,
and every public class or function a public module holds is exported, so nothing
becomes public (or stays hidden) by accident.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import subprocess
import sys
import types

import pytest

import ghostrunner
import ghostrunner.testing

# Public names of private modules that are deliberately not exported from ``ghostrunner``:
# the loop's internals and helpers for backends, importable from their module and
# undocumented. (FakeExecutor and InMemoryStore are exported by ghostrunner.testing.)
INTERNAL = {
    "ghostrunner._planner": {
        "Decision", "abort_reason", "decide", "decide_recovery", "plan_dispatches", "recover",
        "recovery_deadline", "rollout_budget",
    },
    "ghostrunner._types": {"new_id", "task_status", "utcnow", "TagsMode"},
    "ghostrunner._loop": {"Reconciler"},
    "ghostrunner._sqlkit": {"AUDIT_COLS", "DELIVERY_COLS", "STATUS_SQL", "audit_sql",
                            "deliveries_sql", "fleet_fields",
                            "fleet_json", "json_text"},
    "ghostrunner._fanout": {"EventFanout"},
    "ghostrunner._feed": {"EventFeed"},
    "ghostrunner._output": {"cap_output"},
}

#: What an application or a backend author needs, and no more (see __init__'s docstring).
MAX_PUBLIC_NAMES = 30

# public library modules with their own __all__ (ghostrunner.demo is a script)
PUBLIC_MODULES = [
    "ghostrunner",
    "ghostrunner.errors",
    "ghostrunner.events",
    "ghostrunner.tokens",
    "ghostrunner.runners",
    "ghostrunner.testing",
    "ghostrunner.sqlite",
    "ghostrunner.postgres",
    "ghostrunner.meshcentral",
    "ghostrunner.lab",
]


def is_api(obj: object) -> bool:
    return inspect.isclass(obj) or inspect.isfunction(obj)


def private_modules() -> list[str]:
    return sorted(
        f"ghostrunner.{info.name}"
        for info in pkgutil.iter_modules(ghostrunner.__path__)
        if info.name.startswith("_")
    )


@pytest.mark.parametrize("name", ghostrunner.__all__)
def test_every_exported_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from ghostrunner import {name}", namespace)
    assert namespace[name] is getattr(ghostrunner, name)
    assert namespace[name] is not None


@pytest.mark.parametrize("name", ghostrunner.testing.__all__)
def test_every_testing_name_is_importable(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from ghostrunner.testing import {name}", namespace)
    assert namespace[name] is getattr(ghostrunner.testing, name)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_has_no_duplicates(module_name: str) -> None:
    # (its order is ruff's business: RUF022)
    exported = importlib.import_module(module_name).__all__
    assert len(set(exported)) == len(exported)


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_every_public_member_of_ghostrunner_is_exported() -> None:
    # everything GhostRunner defines that the package namespace holds under a public name
    members = {
        name
        for name, obj in vars(ghostrunner).items()
        if not name.startswith("_")
        and not isinstance(obj, types.ModuleType)
        and getattr(obj, "__module__", "").startswith("ghostrunner")
    }
    assert members - set(ghostrunner.__all__) == set()
    assert members  # the check saw something


def test_every_public_member_of_testing_is_exported() -> None:
    members = {
        name
        for name, obj in vars(ghostrunner.testing).items()
        if not name.startswith("_")
        and not isinstance(obj, types.ModuleType)
        and getattr(obj, "__module__", "").startswith("ghostrunner")
    }
    assert members - set(ghostrunner.testing.__all__) == set()
    assert {"FakeClock", "FakeExecutor", "InMemoryStore", "SharedInMemoryStore",
            "crash"} <= members


def test_the_public_api_stays_small() -> None:
    assert len(ghostrunner.__all__) <= MAX_PUBLIC_NAMES, (
        "a new public name: does an application or a backend author need it?"
    )


@pytest.mark.parametrize(
    "module_name",
    [
        "ghostrunner.errors",
        "ghostrunner.events",
        "ghostrunner.tokens",
        "ghostrunner.runners",
        "ghostrunner.sqlite",
        "ghostrunner.postgres",
        "ghostrunner.meshcentral",
        "ghostrunner.lab",
    ],
)
def test_public_submodules_export_what_they_define(module_name: str) -> None:
    module = importlib.import_module(module_name)
    defined = {
        name
        for name, obj in vars(module).items()
        if not name.startswith("_")
        and is_api(obj)
        and (obj.__module__ == module_name or obj.__module__.startswith(module_name + "._"))
    }
    assert defined - set(module.__all__) == set()
    assert defined


@pytest.mark.parametrize("module_name", private_modules())
def test_private_modules_public_api_is_exported(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{module_name} has no __all__"
    public = {
        name: getattr(ghostrunner, name, getattr(ghostrunner.testing, name, None))
        for name in [*ghostrunner.__all__, *ghostrunner.testing.__all__]
    }
    internal = INTERNAL.get(module_name, set())
    for name in exported:
        obj = getattr(module, name)  # every name in a module's __all__ exists
        if not is_api(obj) or name in internal:
            continue
        assert name in public, f"{module_name}.{name} is public but not exported"
        assert public[name] is obj


def test_private_module_list_is_complete() -> None:
    assert set(INTERNAL) <= set(private_modules())
    assert "ghostrunner._types" in private_modules()


def test_events_module_names_every_kind() -> None:
    import ghostrunner.events as ev

    assert ghostrunner.Event is ev.Event
    kinds = {v for k, v in vars(ev).items() if k.isupper() and isinstance(v, str)
             and "." in v}
    assert kinds == set(ev.KINDS) and len(ev.KINDS) == 12


def test_version() -> None:
    assert isinstance(ghostrunner.__version__, str)
    assert ghostrunner.__version__.count(".") >= 2


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError):
        _ = ghostrunner.NoSuchThing


def test_importing_ghostrunner_stays_light() -> None:
    # the MeshCentral client, the PostgreSQL driver and the HTTP layer load only when
    # asked for
    code = (
        "import sys, ghostrunner, ghostrunner.testing; "
        "heavy = ('meshctrl', 'psycopg', 'psycopg_pool', 'starlette', 'uvicorn', "
        "'ghostrunner_http'); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(ghostrunner.__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
        cwd=root,
    )
    assert out.stdout.strip() == "[]"
