"""axe-core (from npm, pinned; `make test` installs it under .cache/axe) on every page a
clinician, reviewer or admin sees, in a real browser: no serious or critical violation. The
label page also works from the keyboard alone and has the landmarks a screen reader
navigates by."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from annotator.models import Scan
from tests.base import REPO
from tests.browser.conftest import login
from tests.browser.test_clinician_ui import wait_ready
from tests.conftest import import_glioma_round

pytestmark = [pytest.mark.django_db(transaction=True)]

AXE_VERSION = "4.11.0"
AXE = Path(os.environ.get("AXE_DIR", REPO / ".cache" / "axe")) / "node_modules" / "axe-core" / "axe.min.js"


def axe_source() -> str:
    if not AXE.exists():
        done = subprocess.run(["npm", "install", "--prefix", str(AXE.parents[2]),
                               f"axe-core@{AXE_VERSION}", "--no-audit", "--no-fund", "--silent"],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not AXE.exists():
            pytest.fail(f"could not install axe-core {AXE_VERSION} from npm into "
                        f"{AXE.parents[2]}: {done.stderr[-2000:]}")
    return AXE.read_text()


def serious_violations(page) -> list[str]:
    page.add_script_tag(content=axe_source())
    result = page.evaluate("""async () => {
        const r = await axe.run(document, {resultTypes: ['violations']});
        return r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical')
          .map(v => `${v.impact} ${v.id}: ${v.help} — ` +
               v.nodes.slice(0, 3).map(n => n.target.join(' ')).join(' | '));
    }""")
    return result


@pytest.fixture
def site(project, users):
    import_glioma_round(project)
    return project


def test_every_page_is_free_of_serious_violations(browser_page, site, users):
    page, project = browser_page, site
    scan = Scan.objects.filter(project=project, split="pool").first()
    job = project.import_jobs.first()
    pages = {"alice": ["/", f"/projects/{project.pk}/", f"/projects/{project.pk}/worklist/",
                       f"/projects/{project.pk}/label/{scan.pk}/", f"/scans/{scan.pk}/",
                       f"/projects/{project.pk}/upload/", f"/imports/{job.pk}/",
                       f"/projects/{project.pk}/reports/", f"/projects/{project.pk}/classify/",
                       f"/projects/{project.pk}/clusters/"],
             "bob": [f"/projects/{project.pk}/review/"]}
    found = {}
    for user, urls in pages.items():
        login(page, user)
        for url in urls:
            response = page.goto(url)
            assert response.status == 200, (url, response.status)
            if "/label/" in url:
                wait_ready(page)
            problems = serious_violations(page)
            if problems:
                found[url] = problems
        page.context.clear_cookies()
    assert not found, "\n".join(f"{u}:\n  " + "\n  ".join(v) for u, v in found.items())


def test_label_page_landmarks_and_keyboard_only(browser_page, site, users):
    page = browser_page
    login(page, "alice")
    page.goto(f"/projects/{site.pk}/worklist/")
    page.wait_for_selector("table.worklist")
    page.keyboard.press("Enter")
    wait_ready(page)
    landmarks = page.evaluate("""() => ({
        main: !!document.querySelector('main'),
        banner: !!document.querySelector('header'),
        complementary: !!document.querySelector('aside[aria-label]'),
        viewer: document.getElementById('viewport').getAttribute('aria-label')})""")
    assert landmarks["main"] and landmarks["banner"] and landmarks["complementary"]
    assert "Scan viewer" in landmarks["viewer"]
    # toggles say whether they are on
    assert page.get_attribute("#invert", "aria-pressed") == "false"
    page.keyboard.press("i")
    assert page.get_attribute("#invert", "aria-pressed") == "true"
    # Tab reaches the answer buttons; Enter on one answers
    scan = page.evaluate("document.body.dataset.scan")
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('class-button')"):
            break
    else:
        raise AssertionError("Tab never reached an answer button")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.body.dataset.scan !== '{scan}'")
