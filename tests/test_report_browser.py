"""The report of a tiny RunAll in headless Chromium: no broken image, no console error, no empty section,
readable example images, no empty table cell, only relative links; a screenshot is kept (report.png in the
test's tmp folder)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from browser import Browser, chromium

PAGE_FACTS = """JSON.stringify({
  images: [...document.images].map(i => ({src: i.getAttribute('src'), natural: i.naturalWidth,
                                          shown: Math.round(i.getBoundingClientRect().width)})),
  sections: [...document.querySelectorAll('section')].map(s => ({id: s.id,
      text: s.innerText.length - s.querySelector('h2').innerText.length,
      content: s.querySelectorAll('p, table, img, figure').length})),
  links: [...document.querySelectorAll('a[href]')].map(a => a.getAttribute('href')),
  pre: document.querySelectorAll('pre').length,
  emptyCells: [...document.querySelectorAll('td')].filter(td => !td.innerText.trim()).length})"""


@pytest.fixture(scope="module")
def report(demo_run, tmp_path_factory) -> Path:
    """A copy of the report folder elsewhere: what opens there holds only relative paths."""
    root, _, proc = demo_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [folder] = (root / "work" / "Report").glob("*/report.html")
    copy = tmp_path_factory.mktemp("moved") / "report"
    shutil.copytree(folder.parent, copy)
    return copy


def installed_chromium() -> str:
    """Chromium's path; the test is skipped, with the reason, only where it is not installed (CI installs it)."""
    executable = chromium()
    if executable is None:
        pytest.skip("Debian's chromium is not installed here (apt-get install -y chromium; .ci/run installs it)")
    return executable


def test_the_browser_sees_a_broken_image_and_a_console_error(tmp_path):
    (tmp_path / "ok.png").write_bytes(cv2.imencode(".png", np.full((8, 8, 3), 200, np.uint8))[1].tobytes())
    page = tmp_path / "page.html"
    page.write_text('<img src="ok.png"><img src="missing.png"><script>console.error("boom")</script>')
    browser = Browser(installed_chromium())
    try:
        browser.open(page.as_uri())
        natural = browser.evaluate("[...document.images].map(i => i.naturalWidth)")
        errors = browser.errors()
    finally:
        browser.close()
    assert natural == [8, 0]
    assert "console: boom" in errors and any("missing.png" in e for e in errors if e.startswith("log: ")), errors


def test_report_renders_in_chromium_with_every_image_and_section(report, tmp_path):
    browser = Browser(installed_chromium())
    try:
        browser.open((report / "report.html").as_uri())
        facts = json.loads(browser.evaluate(PAGE_FACTS))
        browser.screenshot(tmp_path / "report.png")
        errors = browser.errors()
    finally:
        browser.close()
    assert errors == []
    assert [s["id"] for s in facts["sections"]] == [
        "summary", "grounding", "vqa-v2", "vqa-v2-examples", "gqa", "gqa-examples", "nlvr2", "nlvr2-examples",
        "pretraining-curves", "detector"]
    empty = [s["id"] for s in facts["sections"] if s["text"] < 20 or s["content"] == 0]
    assert empty == [] and facts["emptyCells"] == 0
    broken = [i["src"] for i in facts["images"] if i["natural"] == 0]
    assert broken == [] and len(facts["images"]) == 3 * 8 + 2  # examples, pretraining and matching curves
    examples = [i for i in facts["images"] if i["src"].startswith("examples/")]
    assert all(i["natural"] >= 384 and i["shown"] >= 384 for i in examples), examples  # labels readable
    assert all(not src.startswith(("/", "file:", "http")) for src in
               [i["src"] for i in facts["images"]] + facts["links"])
    assert {"summary.json", "metrics.json"} <= set(facts["links"]) and facts["pre"] == 0  # raw figures linked
    assert all((report / link).is_file() for link in facts["links"] if not link.startswith("#"))
    assert (tmp_path / "report.png").stat().st_size > 100_000
