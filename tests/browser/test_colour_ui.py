"""A colour project in a real browser: the worklist thumbnails and the label page show the
blood smears in colour (pixels read back from the page), and a smear is labelled by key."""

from __future__ import annotations

import pytest

from annotator.models import Annotation
from ml_backend import services as ml
from tests.browser.conftest import login
from tests.browser.test_clinician_ui import current_scan, keys_by_class, wait_ready
from tests.ml_backend.test_colour_project import BLOOD, _truth  # noqa: F401
from tests.conftest import run_import

pytestmark = [pytest.mark.django_db(transaction=True)]

# the mean |R - B| over the image's pixels, drawn on a canvas in the page
COLOURFULNESS = """(selector) => {
  const img = document.querySelector(selector);
  const c = document.createElement('canvas');
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const ctx = c.getContext('2d'); ctx.drawImage(img, 0, 0);
  const d = ctx.getImageData(0, 0, c.width, c.height).data;
  let sum = 0; for (let i = 0; i < d.length; i += 4) sum += Math.abs(d[i] - d[i + 2]);
  return sum / (d.length / 4);
}"""


def test_blood_smears_are_labelled_in_colour(browser_page, project, users):
    page = browser_page
    run_import(project, BLOOD / "eval", split="eval", layout="class-folders")
    for cls in ("basophil", "eosinophil", "lymphocyte", "neutrophil"):
        run_import(project, BLOOD / "pool" / cls, layout="flat", dataset_name="PBC smears")
    ml.query_round_create(project=project, strategy="random")
    login(page, "alice")
    page.click(f"text={project.name}")
    page.click("#start-labeling")
    page.wait_for_selector("table.worklist")
    page.keyboard.press("Enter")
    wait_ready(page)
    page.wait_for_function("document.getElementById('scan-image').complete")
    assert page.evaluate(COLOURFULNESS, "#scan-image") > 10      # colour, not grey
    page.shot("colour-label-page")
    scan = current_scan(page)
    page.keyboard.press(keys_by_class(page)[_truth(scan)])
    page.wait_for_function(f"document.body.dataset.scan !== '{scan.pk}'")
    answer = Annotation.objects.get(scan=scan, reader=users["alice"])
    assert answer.label_class.name == _truth(scan)
    assert not page.js_errors, page.js_errors
