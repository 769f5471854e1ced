"""The label page takes an answer only for a scan that is on screen, and never loses one in
silence (the sixth probe's faults 1–3), in a real headless Chromium against the live server:

- a held class key (one keydown, then 30 auto-repeats) answers one scan, not seven; a held
  "0" on a findings scan answers once too;
- a key pressed while the next scan's image is still loading (its request held back) stores
  nothing for that scan, and the page says why; once the image is shown it is answered;
- a scan whose files are lost says "This scan's image could not be loaded: …" in words and
  refuses answers (skip still works); a scan that lost only its preview is shown rendered
  from its stored file and answered as usual;
- an answer that reached the server while the browser got a 502 (or lost the connection),
  then corrected with another key: the correction is stored as the reader's answer and the
  page says what it replaces; the same key again is stored once;
- keys during a slow save are refused with words, an undo pressed then is done once the
  answer is saved, and leaving the page while it saves asks first.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from annotator import storage
from annotator.models import Annotation, ImportJob, Scan
from tests.browser.conftest import login
from tests.conftest import import_glioma_round, run_import

pytestmark = [pytest.mark.django_db(transaction=True)]

COUNT_REPEATS = ("window.repeats = 0; document.addEventListener('keydown', "
                 "(e) => { if (e.repeat) window.repeats += 1; }, true)")


def wait_ready(page) -> str:
    """The scan on screen and answerable; its id."""
    page.wait_for_function("document.body.dataset.scan"
                           " && document.body.dataset.answering === 'ready'")
    return page.evaluate("document.body.dataset.scan")


def hold(page, key: str, repeats: int = 30) -> None:
    """A key held down: one keydown, then the auto-repeats (``repeat: true``) 33 ms apart."""
    page.keyboard.down(key)
    for _ in range(repeats):
        page.wait_for_timeout(33)
        page.keyboard.down(key)
    page.keyboard.up(key)


def answers(user) -> list[tuple[int, str]]:
    return [(a.scan_id, a.label_class.name if a.label_class_id else a.outcome)
            for a in Annotation.objects.filter(reader=user).order_by("created_at", "pk")]


def test_a_held_class_key_answers_one_scan(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=6)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    first = wait_ready(page)
    page.evaluate(COUNT_REPEATS)
    key = page.evaluate("window.medlabel.payload.classes[0].key")
    name = page.evaluate("window.medlabel.payload.classes[0].name")
    hold(page, key)
    page.wait_for_function(f"document.body.dataset.scan !== '{first}'")
    page.wait_for_timeout(1000)          # what the repeats would have answered, had they
    assert page.evaluate("window.repeats") == 30        # the browser did send auto-repeats
    assert answers(users["alice"]) == [(int(first), name)]
    assert page.evaluate("window.medlabel.saved") == 1
    # the scan now shown is open, and answered by a fresh press
    second = wait_ready(page)
    page.keyboard.press(key)
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    assert [scan for scan, _ in answers(users["alice"])] == [int(first), int(second)]


def test_a_held_key_on_a_findings_scan_answers_once(browser_page, project, users, tmp_path):
    from ml_backend import services as ml

    rng = np.random.default_rng(5)
    (tmp_path / "train").mkdir()
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(
            tmp_path / "train" / f"view{i}.png")
    (tmp_path / "labels.csv").write_text(
        "filename,Edema,Nodule\n" + "".join(f"train/view{i}.png,,\n" for i in range(5)))
    job = run_import(project, tmp_path / "labels.csv")
    assert job.status == ImportJob.Status.SUCCEEDED, job.last_error
    ml.query_round_create(project=project, strategy="random")
    page = browser_page
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    page.wait_for_selector("#findings-panel:not([hidden]) li.finding")
    first = wait_ready(page)
    page.evaluate(COUNT_REPEATS)
    hold(page, "0")                       # "no finding", held
    page.wait_for_function(f"document.body.dataset.scan !== '{first}'")
    second = wait_ready(page)
    hold(page, "1", repeats=10)           # a finding's key held: marked present once
    assert page.evaluate("window.repeats") == 40
    assert page.locator("li.finding[data-state=present] .finding-name").all_inner_texts() == [
        "Edema"]
    hold(page, "Enter", repeats=10)
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    page.wait_for_timeout(800)
    stored = list(Annotation.objects.filter(reader=users["alice"]).order_by("created_at"))
    assert [a.scan_id for a in stored] == [int(first), int(second)]
    assert dict(stored[1].findings.values_list("finding__name", "state")) == {
        "Edema": "present", "Nodule": "absent"}


def test_a_key_before_the_next_image_is_shown_answers_nothing(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=6)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    first = wait_ready(page)
    held = []

    def images(route):
        if f"/scans/{first}/" in route.request.url:
            route.continue_()
        else:                             # every other scan's image waits until released
            held.append(route)

    page.route("**/scans/*/preview.png", images)
    page.route("**/scans/*/window.png*", images)
    keys = page.evaluate("window.medlabel.payload.classes.map((c) => c.key)")
    names = page.evaluate("window.medlabel.payload.classes.map((c) => c.name)")
    page.keyboard.press(keys[0])
    page.wait_for_function(f"window.medlabel.payload.scan.id !== {first}")
    second = page.evaluate("String(window.medlabel.payload.scan.id)")
    assert page.evaluate("document.body.dataset.answering") == "loading"
    assert "Loading the scan" in page.inner_text("#image-note")
    assert page.locator("#class-buttons button").first.is_disabled()
    assert page.locator("#skip").is_disabled() and page.locator("#unsure").is_disabled()
    page.keyboard.press(keys[1])          # the reader pressed on, before seeing the scan
    page.keyboard.press("s")
    page.wait_for_timeout(700)
    assert "still loading" in page.inner_text("#status")
    assert answers(users["alice"]) == [(int(first), names[0])]
    assert held, "the next scan's image was not asked for"
    for route in held:                    # the image arrives: now it is answered
        route.continue_()
    page.unroute("**/scans/*/preview.png")
    page.unroute("**/scans/*/window.png*")
    assert wait_ready(page) == second
    assert page.evaluate("document.getElementById('scan-image').naturalWidth") > 0
    page.keyboard.press(keys[1])
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    assert [scan for scan, _ in answers(users["alice"])] == [int(first), int(second)]


def test_a_scan_whose_image_is_lost_says_so_and_takes_no_answer(browser_page, project, users):
    page = browser_page
    query_round = import_glioma_round(project, n=6)
    order = [i.scan for i in query_round.items.order_by("rank").select_related("scan")]
    lost, no_preview = order[0], order[1]
    os.remove(storage.media_path(lost.preview.name))
    os.remove(storage.media_path(lost.file.name))
    os.remove(storage.media_path(no_preview.preview.name))
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    page.wait_for_function("document.body.dataset.answering === 'failed'")
    assert page.evaluate("document.body.dataset.scan") == str(lost.pk)
    note = page.inner_text("#image-note")
    assert note.startswith("This scan's image could not be loaded: "), note
    assert "The preview file is missing" in note and "The stored file is missing" in note
    assert "Answering is off for this scan" in note
    page.shot("lost-image")
    assert page.locator("#class-buttons button").first.is_disabled()
    assert page.locator("#unsure").is_disabled() and page.locator("#skip").is_enabled()
    page.keyboard.press("1")
    page.keyboard.press("u")
    page.wait_for_timeout(600)
    assert "cannot be answered" in page.inner_text("#status")
    assert not Annotation.objects.filter(reader=users["alice"]).exists()
    page.keyboard.press("s")              # skipping it is still possible
    page.wait_for_function(f"document.body.dataset.scan !== '{lost.pk}'")
    assert answers(users["alice"]) == [(lost.pk, "skip")]
    # the next scan lost only its preview: it is shown from its stored file, and answered
    assert wait_ready(page) == str(no_preview.pk)
    assert "window.png?frame=0" in page.get_attribute("#scan-image", "src")
    assert page.evaluate("document.getElementById('scan-image').naturalWidth") > 0
    assert "preview could not be loaded" in page.inner_text("#status")
    page.keyboard.press("2")
    page.wait_for_function(f"document.body.dataset.scan !== '{no_preview.pk}'")
    assert answers(users["alice"]) == [(lost.pk, "skip"), (no_preview.pk, "no_tumor")]


def test_a_correction_after_a_502_or_a_dropped_connection_is_kept(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=6)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    first = wait_ready(page)
    keys = page.evaluate(
        "Object.fromEntries(window.medlabel.payload.classes.map((c) => [c.name, c.key]))")
    failing = {"how": "502"}

    def answer(route):
        if failing["how"] is None:
            route.continue_()
            return
        stored = route.fetch()            # the server stores it; the browser never hears
        assert stored.status == 201, stored.text()
        how, failing["how"] = failing["how"], None
        if how == "502":
            route.fulfill(status=502, content_type="text/html",
                          body="<html><body><h1>502 Bad Gateway</h1></body></html>")
        else:
            route.abort("connectionreset")

    page.route("**/answer/", answer)
    # 1. stored as glioma, 502; the reader corrects to no_tumor: both kept, no_tumor latest
    page.keyboard.press(keys["glioma_tumor"])
    page.wait_for_function("document.getElementById('status').textContent.includes('502')")
    assert "may or may not have been saved" in page.inner_text("#status")
    page.keyboard.press(keys["no_tumor"])
    page.wait_for_function(f"document.body.dataset.scan !== '{first}'")
    stored = list(Annotation.objects.filter(scan_id=int(first), reader=users["alice"])
                  .order_by("created_at", "pk"))
    assert [a.label_class.name for a in stored] == ["glioma_tumor", "no_tumor"]
    assert stored[0].external_id != stored[1].external_id
    assert "it replaces your earlier answer there (glioma_tumor)" in page.inner_text("#answer-note")

    # 2. stored, the connection dropped; the reader corrects: the correction is kept
    second = wait_ready(page)
    failing["how"] = "drop"
    page.keyboard.press(keys["no_tumor"])
    page.wait_for_function(
        "document.getElementById('status').textContent.includes('network error')")
    page.keyboard.press(keys["glioma_tumor"])
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    assert [a.label_class.name for a in Annotation.objects.filter(
        scan_id=int(second), reader=users["alice"]).order_by("created_at", "pk")] == [
        "no_tumor", "glioma_tumor"]

    # 3. stored, 502, the same key again: stored once, and the page says it was saved
    third = wait_ready(page)
    failing["how"] = "502"
    page.keyboard.press(keys["no_tumor"])
    page.wait_for_function("document.getElementById('status').textContent.includes('502')")
    page.keyboard.press(keys["no_tumor"])
    page.wait_for_function(f"document.body.dataset.scan !== '{third}'")
    assert Annotation.objects.filter(scan_id=int(third), reader=users["alice"]).count() == 1
    assert "the earlier request had reached the server" in page.inner_text("#answer-note")


def test_keys_during_a_slow_save_are_said_and_an_undo_waits_for_it(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=6)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    first = wait_ready(page)
    keys = page.evaluate("window.medlabel.payload.classes.map((c) => c.key)")
    held = []
    page.route("**/answer/", lambda route: held.append(route))
    page.keyboard.press(keys[0])
    page.wait_for_function("document.body.dataset.answering === 'saving'")
    page.keyboard.press(keys[1])           # a second answer while the first is saving
    assert "Still saving the last answer" in page.inner_text("#status")
    assert f'"{keys[1]}" was not used' in page.inner_text("#status")
    page.keyboard.press("s")
    assert '"s" was not used' in page.inner_text("#status")
    assert page.locator("#class-buttons button").first.is_disabled()

    # leaving now asks first; staying keeps the save going
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.type), dialog.dismiss()))
    page.click(".crumbs a[href$='/worklist/']", no_wait_after=True)
    page.wait_for_timeout(500)
    assert dialogs == ["beforeunload"]
    assert f"/label/{first}/" in page.url

    page.keyboard.press("Backspace")       # undo, pressed during the save: done after it
    assert "undone once it is saved" in page.inner_text("#status")
    assert len(held) == 1
    with page.expect_navigation():        # undone: the scan is shown to be read again
        held[0].continue_()
    page.unroute("**/answer/")
    assert f"/label/{first}/" in page.url
    wait_ready(page)
    page.wait_for_timeout(300)
    assert not Annotation.objects.filter(reader=users["alice"]).exists()
    assert dialogs == ["beforeunload"]      # the page left by itself: no question then

    # "←" pressed during a save goes to the scan just saved, once it is saved
    page.route("**/answer/", lambda route: held.append(route))
    page.keyboard.press(keys[1])
    page.wait_for_function("document.body.dataset.answering === 'saving'")
    page.keyboard.press("ArrowLeft")
    assert "previous scan once it is saved" in page.inner_text("#status")
    with page.expect_navigation():
        held[1].continue_()
    page.unroute("**/answer/")
    page.wait_for_function(f"window.medlabel && window.medlabel.payload.scan.id === {first} "
                           "&& document.body.dataset.answering === 'ready' "
                           "&& window.medlabel.payload.yours !== null")
    assert answers(users["alice"]) == [(int(first), page.evaluate(
        "window.medlabel.payload.classes[1].name"))]
    assert Scan.objects.filter(pk=int(first)).exists()
