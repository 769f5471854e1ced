"""The label page as a radiologist uses it, in a real browser at 1280×720 and 1920×1080:
answer buttons in view without scrolling, hotkeys that keep working after a slider, a key
that does nothing says why, native size shown and a true 1:1 zoom, window/level from the
stored CT values by preset and by right-drag, previous scan and undo."""

from __future__ import annotations

import shutil

import pytest

from annotator.models import Annotation, Scan
from ml_backend import services as ml
from tests.base import FIXTURES, pydicom_test_files
from tests.browser.conftest import login
from tests.browser.test_clinician_ui import current_scan, keys_by_class, wait_ready
from tests.conftest import import_glioma_round, run_import

pytestmark = [pytest.mark.django_db(transaction=True)]


def _ready(page):
    try:
        wait_ready(page)
    except Exception:
        raise AssertionError(f"label page not ready: {page.js_errors} at {page.url}") from None


def _in_view(page, selector: str) -> bool:
    return page.evaluate("""(sel) => { const r = document.querySelector(sel).getBoundingClientRect();
        return r.top >= 0 && r.bottom <= window.innerHeight && r.left >= 0
               && r.right <= window.innerWidth && r.height > 0; }""", selector)


@pytest.mark.parametrize("size", [(1280, 720), (1920, 1080)])
def test_answer_buttons_fit_and_keys_survive_the_sliders(browser_page, project, users, size):
    page = browser_page
    page.set_viewport_size({"width": size[0], "height": size[1]})
    import_glioma_round(project)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/worklist/")
    page.wait_for_selector("table.worklist")
    page.keyboard.press("Enter")
    _ready(page)
    for selector in ("#class-buttons button:last-child", "#skip", "#unsure", "#scan-image",
                     "#brightness"):
        assert _in_view(page, selector), (size, selector)
    page.shot(f"{size[0]}x{size[1]}")
    # a slider touched with the mouse does not swallow the next hotkey
    page.click("#brightness")
    scan = current_scan(page)
    key = keys_by_class(page)["glioma_tumor"]
    page.keyboard.press(key)
    page.wait_for_function(f"document.body.dataset.scan !== '{scan.pk}'")
    assert Annotation.objects.get(scan=scan, reader=users["alice"]).label_class.name == \
        "glioma_tumor"
    # a key that does nothing says so, and which keys work
    page.keyboard.press("x")
    status = page.inner_text("#status")
    assert '"x" does nothing here' in status and "s skip" in status
    assert not page.js_errors, page.js_errors


def test_native_size_one_to_one_back_and_undo(browser_page, project, users):
    page = browser_page
    page.set_viewport_size({"width": 1280, "height": 720})
    run_import(project, FIXTURES / "chest_xray" / "pool" / "normal", layout="flat")
    ml.query_round_create(project=project, strategy="random")
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/worklist/")
    page.wait_for_selector("table.worklist")
    page.keyboard.press("Enter")
    _ready(page)
    page.wait_for_function("document.getElementById('scan-image').complete")
    native = page.inner_text("#native-size")
    assert native.startswith("28×28 px, shown at") and "×" in native.split("at")[1]
    assert page.evaluate("document.getElementById('scan-image').classList.contains('pixelated')")
    page.keyboard.press("n")
    assert page.inner_text("#native-size") == "28×28 px, shown at 1.0×"
    first = current_scan(page)
    page.keyboard.press("s")                                   # skip it
    page.wait_for_function(f"document.body.dataset.scan !== '{first.pk}'")
    # previous scan: back to the one just answered, which says what was answered
    page.keyboard.press("ArrowLeft")
    page.wait_for_function(f"document.body.dataset.scan === '{first.pk}'")
    assert "You answered this scan before: skip" in page.inner_text("#yours")
    # answer it again, then undo that answer: the scan comes back, the answer is gone
    page.keyboard.press("u")
    page.wait_for_function(f"document.body.dataset.scan !== '{first.pk}'")
    unsure = Annotation.objects.get(scan=first, reader=users["alice"], outcome="unsure")
    page.keyboard.press("Backspace")
    page.wait_for_function(f"document.body.dataset.scan === '{first.pk}'")
    assert not Annotation.objects.filter(pk=unsure.pk).exists()
    assert Annotation.objects.filter(scan=first, outcome="skip").exists()
    assert not page.js_errors, page.js_errors


def test_ct_window_presets_and_right_drag(browser_page, project, users, tmp_path):
    page = browser_page
    source = {p.name: p for p in pydicom_test_files()}["CT_small.dcm"]
    (tmp_path / "ct").mkdir()
    shutil.copy(source, tmp_path / "ct" / "ct.dcm")
    run_import(project, tmp_path / "ct", dataset_name="CT")
    scan = Scan.objects.get(project=project, modality="CT")
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/label/{scan.pk}/")
    _ready(page)
    assert page.is_visible("#window-tools")
    before = page.inner_text("#window-readout")
    assert before.startswith("W ") and before.endswith("HU")
    # a preset renders the stored HU values with that window
    lung = page.evaluate("""() => [...document.querySelectorAll('#window-preset option')]
        .find(o => o.textContent.startsWith('Lung')).value""")
    page.select_option("#window-preset", lung)
    page.wait_for_function("document.getElementById('scan-image').src.includes('window.png')")
    assert "W 1500 L -600 HU" == page.inner_text("#window-readout")
    page.wait_for_function("document.getElementById('scan-image').complete")
    # right-drag: wider to the right, level down
    box = page.locator("#viewport").bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down(button="right")
    page.mouse.move(x + 120, y + 60, steps=6)
    page.mouse.up(button="right")
    page.wait_for_function("!document.getElementById('window-readout').textContent.startsWith('W 1500 L -600')")
    page.wait_for_function("document.getElementById('scan-image').complete")
    src = page.evaluate("document.getElementById('scan-image').src")
    assert "window.png?center=" in src
    assert page.evaluate("document.getElementById('scan-image').naturalWidth") == 128
    page.shot("ct-window")
    assert not page.js_errors, page.js_errors


def test_compare_with_similar_labeled_scans(browser_page, encoded_project, users):
    from annotator import services
    from annotator.models import LabelClass

    page, project = browser_page, encoded_project
    label = LabelClass.objects.filter(project=project).first()
    pool = list(project.scans.filter(split="pool").order_by("pk"))
    for scan in pool[:4]:
        services.annotation_create(scan=scan, reader=users["bob"], label_class=label)
    target = pool[-1]
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/label/{target.pk}/")
    _ready(page)
    similar = page.evaluate("window.medlabel.payload.similar")
    assert similar, "the encoded project should offer similar labeled scans"
    page.keyboard.press("c")
    page.wait_for_function(
        f"document.getElementById('scan-image').src.endsWith('/scans/{similar[0]['scan']}/preview.png')")
    note = page.inner_text("#compare-note")
    assert f"similar scan #{similar[0]['scan']}" in note and "Esc" in note
    page.keyboard.press("Escape")
    page.wait_for_function(
        f"document.getElementById('scan-image').src.endsWith('/scans/{target.pk}/preview.png')")
    assert page.is_hidden("#compare-note")
    assert not page.js_errors, page.js_errors


def test_a_series_scrolls_slice_by_slice(browser_page, project, users, tmp_path):
    """A CT series imported as one scan: ↑/↓ and the wheel page through its slices in
    position order, each rendered from the stored values, the readout saying where."""
    from annotator import services as annotator_services
    from bench.dicom_series import write_series

    page = browser_page
    project.dicom_grouping = "series"
    project.save(update_fields=["dicom_grouping"])
    write_series(tmp_path / "ct", patients=1, slices=5)
    run_import(project, tmp_path / "ct", dataset_name="CT", layout="flat")
    annotator_services.label_class_get_or_create(project=project, name="normal")
    scan = Scan.objects.get(project=project)
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/label/{scan.pk}/")
    _ready(page)
    assert page.inner_text("#slice-readout") == "slice 3 / 5 · -10.0 mm"   # the middle one

    def shown() -> tuple[str, str]:
        page.wait_for_function("""() => { const i = document.getElementById('scan-image');
            return i.complete && i.naturalWidth > 0; }""")
        return (page.inner_text("#slice-readout"),
                page.evaluate("document.getElementById('scan-image').src"))

    for _ in range(4):
        page.keyboard.press("ArrowUp")                # up to the first slice (and no further)
    readouts = [shown()]
    for _ in range(4):
        page.keyboard.press("ArrowDown")
        readouts.append(shown())
    assert [r for r, _ in readouts] == [f"slice {k} / 5 · {-20.0 + 5 * (k - 1):.1f} mm"
                                        for k in range(1, 6)]
    sources = [s for _, s in readouts]
    assert "frame=0" in sources[0] and "frame=4" in sources[4]
    assert sources[2].endswith("/preview.png") or "frame=" not in sources[2]
    # the wheel scrolls too (Ctrl + wheel would zoom)
    box = page.locator("#viewport").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -120)
    page.wait_for_function("document.getElementById('slice-readout').textContent.startsWith('slice 4 / 5')")
    assert page.inner_text("#zoom-level") == "fit"          # the wheel did not zoom
    page.shot("series-slices")
    assert not page.js_errors, page.js_errors
