"""The pure-ML core of ml_backend must not import Django (STYLE.md)."""

from __future__ import annotations

import ast

from tests.base import REPO

CORE = ["ssl", "active", "index", "metrics", "data"]
CORE_MODULES = ["explain.py", "charts.py"]


def test_core_modules_import_no_django():
    offenders = []
    checked = 0
    paths = [p for package in CORE for p in (REPO / "ml_backend" / package).rglob("*.py")]
    paths += [REPO / "ml_backend" / name for name in CORE_MODULES]
    for path in paths:
        checked += 1
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in ("django", "annotator", "medsite") or name in ("ml_backend.models", "ml_backend.services", "ml_backend.tasks", "ml_backend.views"):
                    offenders.append(f"{path.relative_to(REPO)}: imports {name}")
    assert checked > 0
    assert offenders == []
