"""The web process freezes what a burst of heavy imports leaves behind, once, after the
response (medsite/gcfreeze.py), so later full garbage collections do not walk it."""

from __future__ import annotations

import gc
import sys
import types
import weakref

import pytest
from django.urls import reverse

from medsite import gcfreeze


class Node:
    """An object in a reference cycle: only the cyclic collector can free it."""

    def __init__(self):
        self.me = self


@pytest.fixture
def unfreeze_after():
    yield
    gc.unfreeze()


def _walked_by_the_collector(obj) -> bool:
    return any(o is obj for o in gc.get_objects())


def _import_fake_modules(monkeypatch, count: int) -> Node:
    kept = Node()                      # a long-lived object, as a library's tables are
    for number in range(count):
        module = types.ModuleType(f"_medlabel_fake_heavy_{number}")
        module.table = kept
        monkeypatch.setitem(sys.modules, module.__name__, module)
    return kept


def test_after_heavy_imports_a_request_freezes_what_lives_on_and_collects_the_rest(
        client, settings, monkeypatch, unfreeze_after):
    login = reverse("login")
    settings.GC_FREEZE_NEW_MODULES = 0
    assert client.get(login).status_code == 200          # the page's own imports
    settings.GC_FREEZE_NEW_MODULES = 50
    monkeypatch.setattr(gcfreeze, "_modules_at_freeze", len(sys.modules))
    frozen = gc.get_freeze_count()
    assert client.get(login).status_code == 200
    assert gc.get_freeze_count() == frozen, "no imports, no freeze"

    kept = _import_fake_modules(monkeypatch, 60)
    dropped = weakref.ref(Node())      # garbage of the moment, in a cycle
    assert dropped() is not None and _walked_by_the_collector(kept)
    assert client.get(login).status_code == 200
    assert dropped() is None, "the garbage of the moment is collected, not frozen"
    assert not _walked_by_the_collector(kept), "the long-lived object is frozen"
    assert gc.get_freeze_count() > frozen
    # the next requests import nothing new: no second collection
    collections = gcfreeze._modules_at_freeze
    assert client.get(login).status_code == 200 and gcfreeze._modules_at_freeze == collections


def test_zero_turns_it_off(client, settings, monkeypatch, unfreeze_after):
    settings.GC_FREEZE_NEW_MODULES = 0
    monkeypatch.setattr(gcfreeze, "_modules_at_freeze", len(sys.modules))
    kept = _import_fake_modules(monkeypatch, 60)
    frozen = gc.get_freeze_count()
    assert client.get(reverse("login")).status_code == 200
    assert gc.get_freeze_count() == frozen and _walked_by_the_collector(kept)
