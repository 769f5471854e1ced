"""The shape of the code (docs/ARCHITECTURE.md), checked on every run:

- the web app (``annotator``) uses the ML adapter (``ml_backend``); the adapter imports only
  annotator's models, storage and selectors — never its behaviour — and no import cycle
  joins the two apps;
- the pure-ML core (``ml_backend/{ssl,active,index,metrics,data}``) imports no Django, no
  app module and reads no environment variable;
- the URLconf, the admin and commands that do no ML do not import torch.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APPS = ("annotator", "ml_backend")
CORE = ("ml_backend/ssl", "ml_backend/active", "ml_backend/index", "ml_backend/metrics",
        "ml_backend/data")
ADAPTER_MAY_IMPORT = {"annotator.models", "annotator.storage", "annotator.selectors"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources():
    for app in APPS:
        for path in sorted((ROOT / app).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            yield path


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every project module ``path`` imports, at any depth (module level or in a function),
    as (module, line). ``from package import name`` counts ``package.name`` when that is a
    module of ours, else ``package``."""
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                as_path = ROOT / Path(*candidate.split("."))
                is_module = as_path.with_suffix(".py").exists() or (as_path / "__init__.py").exists()
                found.append((candidate if is_module else node.module, node.lineno))
    return [(name, line) for name, line in found if name.split(".")[0] in APPS]


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in _sources():
        graph.setdefault(_module_name(path), set()).update(name for name, _ in _imports(path))
    return graph


def test_the_ml_adapter_imports_only_annotators_models_storage_and_selectors():
    wrong = []
    for path in _sources():
        if _module_name(path).startswith("ml_backend"):
            wrong += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                      for name, line in _imports(path)
                      if name.startswith("annotator") and name not in ADAPTER_MAY_IMPORT]
    assert not wrong, "ml_backend must not use the web app's behaviour:\n" + "\n".join(wrong)


def _strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            result.append(component)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def test_no_import_cycle_joins_the_two_apps():
    cycles = [sorted(c) for c in _strongly_connected(_graph())
              if len({m.split(".")[0] for m in c}) > 1]
    assert not cycles, f"import cycles between annotator and ml_backend: {cycles}"


def test_the_graph_walk_would_see_a_cycle():
    """The checker itself: a planted two-app cycle is found."""
    graph = {"annotator.a": {"ml_backend.b"}, "ml_backend.b": {"annotator.a"}, "annotator.c": set()}
    assert [sorted(c) for c in _strongly_connected(graph) if len(c) > 1] == [
        ["annotator.a", "ml_backend.b"]]


def test_the_pure_core_imports_no_django_no_app_and_reads_no_environment():
    wrong = []
    for directory in CORE:
        for path in sorted((ROOT / directory).rglob("*.py")):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module
                         else [])
                for name in names:
                    top = name.split(".")[0]
                    if top in ("django", "annotator", "celery") or name.startswith(
                            ("ml_backend.services", "ml_backend.models", "ml_backend.views",
                             "ml_backend.tasks", "ml_backend.dispatch")):
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
                if (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")
                        and isinstance(node.value, ast.Name) and node.value.id == "os"):
                    wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} reads os.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_the_urlconf_admin_and_plain_commands_do_not_import_torch():
    code = ("import sys, django; django.setup()\n"
            "import medsite.urls, annotator.admin, ml_backend.admin, annotator.views, "
            "annotator.views_label, annotator.views_reports, annotator.views_review, "
            "ml_backend.views, annotator.tasks, ml_backend.tasks, medsite.celery\n"
            "from django.core.management import call_command\n"
            "call_command('check')\n"
            "heavy = sorted(m for m in ('torch', 'torchvision') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "medsite.settings"}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout[-2000:]


def test_only_the_pacs_push_decrypts_the_linkage():
    """The honest-broker linkage is read (decrypted) by the PACS push alone, and never
    registered in the admin nor written to a backup."""
    readers = []
    for path in _sources():
        if path.name == "linkage.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "annotator.linkage":
                if any(alias.name == "linkage_read" for alias in node.names):
                    readers.append(_module_name(path))
            if isinstance(node, ast.Attribute) and node.attr == "linkage_read":
                readers.append(_module_name(path))
    assert sorted(set(readers)) == ["annotator.pacs"]
    for name in ("admin.py", "backup.py"):
        source = (ROOT / "annotator" / name).read_text()
        assert "DicomLinkage" not in source and "linkage" not in source.lower(), name
