"""The pure-ML core of ml_backend must not import Django (STYLE.md)."""

from __future__ import annotations

import ast

from tests.base import REPO

CORE = ["ssl", "active", "index", "metrics", "data"]


def test_core_modules_import_no_django():
    offenders = []
    checked = 0
    for package in CORE:
        for path in (REPO / "ml_backend" / package).rglob("*.py") if (REPO / "ml_backend" / package).exists() else []:
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
