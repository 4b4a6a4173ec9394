"""The report in a real browser: headless Chromium (the Debian package `chromium`), driven by Playwright.

We never run `playwright install`: the wheel bundles its driver, and the browser is the system's /usr/bin/chromium.
Every request the page makes is intercepted: the page itself (file://) and data: URIs go through, anything else is
recorded and aborted, so a regression shows up as a failure here and never reaches the network.
Off CI a machine without Chromium or Playwright skips these tests; on CI (``CI`` set) that is a failure.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_report import make_data

from engine.report import render_report

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-default-apps", "--mute-audio"]
MIN_DRAWN = 10  # SVG shapes a real matplotlib figure has at the very least (axes, ticks, labels, marks)

# Per <figure>: its <svg>'s box and how many shapes it draws (in the page, after layout).
_FIGURES_JS = """() => Array.from(document.querySelectorAll('figure')).map((f, i) => {
  const svg = f.querySelector('svg');
  if (!svg) return {i, svg: false, w: 0, h: 0, drawn: 0, label: ''};
  const r = svg.getBoundingClientRect();
  const drawn = svg.querySelectorAll('path, line, polyline, polygon, rect, circle, ellipse, text, use').length;
  return {i, svg: true, w: r.width, h: r.height, drawn, label: svg.getAttribute('aria-label') || '',
          caption: (f.querySelector('figcaption') || {}).textContent || ''};
})"""


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must run the browser check (.ci/run installs the Debian package `chromium`)")
    pytest.skip(reason)


@dataclass
class PageReport:
    """What the browser saw while loading one page."""

    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # everything but the page itself and data: URIs
    figures: list[dict[str, Any]] = field(default_factory=list)
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        out = [f"console error: {e}" for e in self.console_errors]
        out += [f"network request: {u}" for u in self.requests]
        for f in self.figures:
            if not f["svg"]:
                out.append(f"figure {f['i']} has no <svg>")
            elif f["w"] <= 0 or f["h"] <= 0 or f["drawn"] < MIN_DRAWN:
                out.append(f"figure {f['i']} is empty: {f['w']:.0f}×{f['h']:.0f} px, {f['drawn']} shapes")
            elif not f["label"] or not f["caption"].strip():
                out.append(f"figure {f['i']} lacks alt text or a caption")
        return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """One headless Chromium (fresh profile) for the module; each test opens its own page."""
    if not CHROMIUM.exists() and shutil.which("chromium") is None:
        _unavailable(f"headless Chromium not found at {CHROMIUM} (Debian package `chromium`)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed: pip install -e '.[test]'")
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            headless=True, args=ARGS, viewport={"width": 1100, "height": 900}, offline=True)
        yield context
        context.close()


def load(context: Any, html_path: Path, screenshot: Path | None = None) -> PageReport:
    """Open ``html_path`` and record console errors, uncaught exceptions, requests and every figure's geometry."""
    seen = PageReport()
    page_url = html_path.resolve().as_uri()
    page = context.new_page()
    page.on("console", lambda m: seen.console_errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen.console_errors.append(f"uncaught: {e}"))

    def route(r: Any) -> None:
        url = r.request.url
        if url == page_url or url.startswith("data:"):
            r.continue_()
        else:
            seen.requests.append(url)
            r.abort()

    page.route("**/*", route)
    page.on("requestfailed", lambda r: None if r.url in seen.requests or r.url == page_url
            else seen.requests.append(r.url))
    page.goto(page_url, wait_until="load")
    page.wait_for_load_state("networkidle")
    seen.figures = page.evaluate(_FIGURES_JS)
    if screenshot is not None:
        page.screenshot(path=str(screenshot), full_page=True)
        seen.screenshot = screenshot
    page.close()
    return seen


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_report(make_data(), tmp_path_factory.mktemp("browser") / "report.html")


def test_report_renders_cleanly_in_chromium(browser: Any, report_html: Path, tmp_path: Path) -> None:
    seen = load(browser, report_html, screenshot=tmp_path / "report.png")
    assert seen.problems() == []
    # every figure the report has: 3 allocation curves, TV vs slope, explanations, the notebooks' quantity
    assert len(seen.figures) == 8 == report_html.read_text().count("<figure>")  # 5 curve figures (3 null partitions)
    assert all(f["w"] > 300 and f["h"] > 100 for f in seen.figures)
    png = seen.screenshot.read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 100_000  # a long page of text and plots


@pytest.mark.parametrize("injected, expected", [
    ('<img src="http://example.invalid/x.png" alt="">', r"network request: http://example\.invalid/x\.png"),
    ("<script>console.error('x')</script>", r"console error: x"),
    ("<script>undefinedFunction()</script>", r"console error: uncaught: .*undefinedFunction"),
    ('<link rel="stylesheet" href="https://example.invalid/s.css">', r"network request: https://example\.invalid"),
    ("<figure><svg width='200' height='100'></svg><figcaption>c</figcaption></figure>", r"figure 8 is empty"),
    ("<figure><figcaption>no picture</figcaption></figure>", r"figure 8 has no <svg>"),
])
def test_the_check_catches_regressions(browser: Any, report_html: Path, tmp_path: Path, injected: str,
                                       expected: str) -> None:
    """The browser check is real: each broken variant of the report fails it, with a message that says why."""
    bad = tmp_path / "bad.html"
    bad.write_text(report_html.read_text().replace("</body>", injected + "\n</body>"), encoding="utf-8")
    problems = load(browser, bad).problems()
    assert any(re.search(expected, p) for p in problems), problems
