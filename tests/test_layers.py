"""What import-linter cannot say: the HTTP package imports only the library's public
modules (``ghostrunner``, ``ghostrunner.errors``, ``ghostrunner.tokens``,
``ghostrunner.testing``, ``ghostrunner.sqlite``...), never a private one
(``ghostrunner._loop``, ``ghostrunner.meshcentral._executor``). New modules fall under
the rule by their name alone."""

from __future__ import annotations

import ast
from pathlib import Path

import ghostrunner_http

HTTP = Path(ghostrunner_http.__file__).parent


def library_imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return [(line, name) for line, name in found if name.split(".")[0] == "ghostrunner"]


def test_http_package_uses_only_public_library_modules() -> None:
    private = [
        f"{path.name}:{line}: {name}"
        for path in sorted(HTTP.glob("*.py"))
        for line, name in library_imports(path)
        if any(part.startswith("_") for part in name.split("."))
    ]
    assert private == []


def test_the_check_sees_imports() -> None:
    seen = {name for path in HTTP.glob("*.py") for _, name in library_imports(path)}
    assert {"ghostrunner", "ghostrunner.errors", "ghostrunner.tokens"} <= seen
