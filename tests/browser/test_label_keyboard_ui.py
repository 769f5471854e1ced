"""The label page from the keyboard, for a screen reader and over idle time (a hostile
tester's faults on /label/ and /next/), in a real headless Chromium against the live server:

- a slider or the window preset list reached by Tab keeps the focus while it is adjusted
  (arrows, PageUp/PageDown, Home/End), Escape hands the keys back to the page, and letters
  pressed on a slider are still hotkeys;
- the focused viewer pans with the arrows once zoomed in (Shift: finer); [ ] { } change the
  window of a greyscale scan; the viewer's name and the key help list these keys;
- after an answer the status line says what was saved and which scan is now shown; a pressed
  button that is gone leaves the focus on the viewer, focus still on a control stays there;
- "Single-key shortcuts" off (kept in localStorage): a class key answers nothing, a click does;
- duration_ms counts only visible, active time (hidden and idle minutes are not reading);
- a CSRF refusal (403 JSON with "csrf": true, or a 403 that is not JSON) says the answer was
  NOT saved and offers a reload, never "press it again".
"""

from __future__ import annotations

import re
import shutil

import pytest

from annotator.models import Annotation, Scan
from tests.base import pydicom_test_files
from tests.browser.conftest import login
from tests.conftest import import_glioma_round, run_import

pytestmark = [pytest.mark.django_db(transaction=True)]

FOCUSED = "document.activeElement && (document.activeElement.id || document.activeElement.tagName)"


def wait_ready(page) -> str:
    page.wait_for_function("document.body.dataset.scan"
                           " && document.body.dataset.answering === 'ready'")
    return page.evaluate("document.body.dataset.scan")


def readout(page) -> tuple[float, float]:
    """The window readout "W 400 L 40 HU" as (width, level)."""
    text = page.inner_text("#window-readout")
    match = re.match(r"W (-?[\d.]+) L (-?[\d.]+)", text)
    assert match, text
    return float(match.group(1)), float(match.group(2))


def offset(page) -> tuple[float, float]:
    """Where the stage is drawn: translate(x, y) of its transform."""
    match = re.match(r"translate\((-?[\d.]+)px, (-?[\d.]+)px\)",
                     page.evaluate("document.getElementById('stage').style.transform"))
    return float(match.group(1)), float(match.group(2))


def test_sliders_presets_pan_and_window_from_the_keyboard(browser_page, project, users, tmp_path):
    page = browser_page
    source = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"]
    (tmp_path / "ct").mkdir()
    shutil.copy(source, tmp_path / "ct" / "ct.dcm")
    run_import(project, tmp_path / "ct", dataset_name="CT")
    scan = Scan.objects.get(project=project, modality="CT")
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/label/{scan.pk}/")
    wait_ready(page)

    # a slider keeps the focus while it is moved with keys
    page.focus("#contrast")
    for _ in range(10):
        page.keyboard.press("ArrowRight")
    assert page.evaluate(FOCUSED) == "contrast"
    assert page.input_value("#contrast") == "110"
    page.keyboard.press("PageUp")                  # the slider's, not the previous slice
    assert page.evaluate(FOCUSED) == "contrast"
    assert int(page.input_value("#contrast")) > 110
    assert "one image" not in page.inner_text("#status")
    page.keyboard.press("Home")
    assert page.input_value("#contrast") == "20"
    page.keyboard.press("End")
    assert page.input_value("#contrast") == "400" and page.evaluate(FOCUSED) == "contrast"
    page.keyboard.press("i")                        # a letter on a slider is still a hotkey
    assert page.get_attribute("#invert", "aria-pressed") == "true"
    page.keyboard.press("Escape")                   # Escape hands the keys back to the page
    assert page.evaluate(FOCUSED) == "BODY"

    # the window preset list: two ↓ choose the second preset after the first, focus kept
    page.focus("#window-preset")
    page.keyboard.press("ArrowDown")
    page.keyboard.press("ArrowDown")
    assert page.input_value("#window-preset") == "2"
    assert page.evaluate(FOCUSED) == "window-preset"
    preset = page.evaluate("window.medlabel.payload.scan.window.presets[2]")
    assert readout(page) == (preset["width"], preset["center"])
    page.keyboard.press("Escape")
    assert page.evaluate(FOCUSED) == "BODY"

    # [ ] change the width, { } the level (a tenth of the width a press)
    width, level = readout(page)
    page.keyboard.press("]")
    assert readout(page) == (pytest.approx(width * 1.1, rel=0.01), pytest.approx(level, abs=1))
    page.keyboard.press("[")
    page.keyboard.press("[")
    assert readout(page)[0] == pytest.approx(width / 1.1, rel=0.01)
    width, level = readout(page)
    page.keyboard.press("}")
    assert readout(page)[1] == pytest.approx(level + width / 10, abs=1)
    page.keyboard.press("{")
    page.keyboard.press("{")
    assert readout(page)[1] == pytest.approx(level - width / 10, abs=1)
    page.wait_for_function("document.getElementById('scan-image').src.includes('window.png?center=')")

    # the focused viewer: the arrows pan once zoomed in, a tenth of the viewer (Shift: finer)
    label = page.get_attribute("#viewport", "aria-label")
    assert "Scan viewer" in label and "arrows pan" in label and "[ and ]" in label, label
    page.focus("#viewport")
    page.keyboard.press("ArrowRight")               # at fit: nothing to pan
    assert offset(page) == (0, 0)
    page.keyboard.press("+")
    box = page.locator("#viewport").bounding_box()
    x, y = offset(page)
    page.keyboard.press("ArrowRight")
    assert offset(page) == (pytest.approx(x - box["width"] / 10, abs=1), pytest.approx(y, abs=0.1))
    page.keyboard.press("Shift+ArrowDown")
    assert offset(page) == (pytest.approx(x - box["width"] / 10, abs=1),
                            pytest.approx(y - box["height"] / 50, abs=1))
    assert page.evaluate(FOCUSED) == "viewport"
    page.keyboard.press("h")
    help_text = page.inner_text("#status")
    assert "[ ] window width" in help_text and "arrows pan" in help_text, help_text
    assert not page.js_errors, page.js_errors


def test_answers_are_announced_focus_kept_shortcuts_switch_and_csrf(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=8)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/next/")
    first = wait_ready(page)
    classes = page.evaluate("window.medlabel.payload.classes")

    # an answer button pressed with Enter: said in the live status line, focus on the viewer
    page.focus("#class-buttons button")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.body.dataset.scan !== '{first}'")
    second = page.evaluate("String(window.medlabel.payload.scan.id)")
    assert page.evaluate("""() => { const s = document.getElementById('status');
        return s.getAttribute('aria-live') === 'polite' || s.getAttribute('role') === 'status'; }""")
    assert page.inner_text("#status") == (
        f"Saved {classes[0]['name']} on #{first}; now reading #{second}.")
    assert page.evaluate(FOCUSED) == "viewport"

    # focus on a control that stays: left there
    wait_ready(page)
    page.focus("#brightness")
    page.keyboard.press(classes[1]["key"])
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    assert page.evaluate(FOCUSED) == "brightness"
    third = wait_ready(page)

    # single-key shortcuts off (remembered): a class key answers nothing, a click does
    assert page.is_checked("#shortcuts")
    page.uncheck("#shortcuts")
    page.reload()
    assert wait_ready(page) == third
    assert not page.is_checked("#shortcuts")
    assert page.evaluate(FOCUSED) == "BODY"          # keys go to the page itself
    for key in (classes[0]["key"], "s", "ArrowLeft", "ArrowDown"):
        page.keyboard.press(key)
    page.wait_for_timeout(700)
    assert page.evaluate("document.body.dataset.scan") == third
    assert not Annotation.objects.filter(scan_id=int(third)).exists()
    page.click("#class-buttons button")
    page.wait_for_function(f"document.body.dataset.scan !== '{third}'")
    assert Annotation.objects.filter(scan_id=int(third), reader=users["alice"]).count() == 1
    page.check("#shortcuts")
    fourth = wait_ready(page)

    # a CSRF refusal, then a 403 that is not JSON: NOT saved, reload offered
    for body, content_type in (
            ('{"error": "CSRF verification failed. Request aborted.", "csrf": true}',
             "application/json"),
            ("<html><body><h1>403 Forbidden</h1></body></html>", "text/html")):
        def refuse(route, body=body, content_type=content_type):
            route.fulfill(status=403, content_type=content_type, body=body)

        page.route("**/answer/", lambda route: refuse(route))
        page.keyboard.press(classes[0]["key"])
        page.wait_for_selector("#status #reload-page")
        status = page.inner_text("#status")
        assert f"Your answer ({classes[0]['name']}) was NOT saved" in status, status
        assert "Reload the page" in status
        assert "Press it again" not in status and "may or may not" not in status, status
        page.unroute("**/answer/")
    assert not Annotation.objects.filter(scan_id=int(fourth)).exists()
    with page.expect_navigation():
        page.click("#reload-page")
    assert wait_ready(page) == fourth
    page.js_errors.clear()                          # the stubbed 403s were logged
    page.keyboard.press(classes[0]["key"])
    page.wait_for_function(f"document.body.dataset.scan !== '{fourth}'")
    assert Annotation.objects.filter(scan_id=int(fourth), reader=users["alice"]).count() == 1
    assert not page.js_errors, page.js_errors


def test_reading_time_leaves_out_hidden_and_idle_time(browser_page, project, users):
    page = browser_page
    import_glioma_round(project, n=4)
    login(page, "alice")
    page.clock.install()
    page.goto(f"/projects/{project.pk}/next/")
    first = wait_ready(page)
    key = page.evaluate("window.medlabel.payload.classes[0].key")

    def visibility(state: str) -> None:
        page.evaluate("""(state) => {
            Object.defineProperty(document, 'visibilityState', {value: state, configurable: true});
            document.dispatchEvent(new Event('visibilitychange')); }""", state)

    # ten minutes in another tab: not reading
    visibility("hidden")
    page.clock.fast_forward("10:00")
    visibility("visible")
    page.keyboard.press(key)
    page.wait_for_function(f"document.body.dataset.scan !== '{first}'")
    duration = Annotation.objects.get(scan_id=int(first)).duration_ms
    assert duration is not None and duration < 60_000, duration

    # half an hour with the page open and no input: two minutes count, then nothing
    second = wait_ready(page)
    page.clock.fast_forward("30:00")
    page.keyboard.press(key)
    page.wait_for_function(f"document.body.dataset.scan !== '{second}'")
    duration = Annotation.objects.get(scan_id=int(second)).duration_ms
    assert 120_000 <= duration < 150_000, duration
