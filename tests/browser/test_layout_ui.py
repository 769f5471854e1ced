"""Layout a user sees, measured in a real browser: thumbnails stay thumbnails whatever the
scan's own size (a 28-pixel chest film beside a 512-pixel MRI), and no table or image runs
past the card that holds it (a report with six classes once drew its confusion table under
the next card)."""

from __future__ import annotations

import pytest

from tests.browser.conftest import login

pytestmark = [pytest.mark.django_db(transaction=True)]

THUMBNAIL = 72          # px: img.mini in site.css

# Tables and images whose right edge is past their card's, where the card does not scroll.
OVERFLOWING = """() => [...document.querySelectorAll('.card table, .card img')].filter(el => {
    const card = el.closest('.card');
    if (getComputedStyle(card).overflowX !== 'visible') return false;
    return el.getBoundingClientRect().right > card.getBoundingClientRect().right + 1;
  }).map(el => `${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}.${el.className}`)"""


def overflowing(page) -> list[str]:
    page.wait_for_function("[...document.images].every(i => i.complete)")
    return page.evaluate(OVERFLOWING)


def test_cluster_thumbnails_are_thumbnails_and_stay_in_their_cards(browser_page, encoded_project,
                                                                   users):
    page, project = browser_page, encoded_project
    login(page, "alice")
    page.goto(f"/projects/{project.pk}/clusters/")
    thumbs = page.locator("#clusters img.mini")
    assert thumbs.count() >= 2
    for thumb in thumbs.all():
        thumb.scroll_into_view_if_needed()
    page.wait_for_function("[...document.querySelectorAll('img.mini')].every(i => i.complete "
                           "&& i.naturalWidth > 0)")
    sizes = page.evaluate("[...document.querySelectorAll('#clusters img.mini')].map(i => {"
                          "const r = i.getBoundingClientRect(); return [r.width, r.height, "
                          "i.naturalWidth]; })")
    assert max(s[2] for s in sizes) > THUMBNAIL          # the fixtures' own size is larger
    assert all(w <= THUMBNAIL + 0.5 and h <= THUMBNAIL + 0.5 for w, h, _ in sizes), sizes
    page.shot("clusters")
    assert overflowing(page) == []
    for url in (f"/projects/{project.pk}/", f"/projects/{project.pk}/worklist/",
                f"/projects/{project.pk}/reports/"):
        page.goto(url)
        assert overflowing(page) == [], url
    assert not page.js_errors, page.js_errors
