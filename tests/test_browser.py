"""The rendered book in a real browser: headless Chromium over the built HTML (``make book`` first).

Run after the book is built; without a build the tests are skipped, except in CI, where a missing build
is a failure. Screenshots of every page land in ``_build/screenshots`` for people to look at.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
HTML = ROOT / "_build" / "html"
EXECUTED = ROOT / "_build" / "jupyter_execute"
SCREENSHOTS = ROOT / "_build" / "screenshots"
# Debian's Chromium (.ci/run installs it), else a Chrome already on the machine (GitHub's runners have one).
CHROMIUM = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
                "/usr/bin/chromium")


def _pages() -> list[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    pages = [toc["root"]]
    for part in toc.get("parts", []):
        pages += [chapter["file"] for chapter in part["chapters"]]
    return pages


PAGES = _pages()
CHAPTERS = [p for p in PAGES if (ROOT / f"{p}.ipynb").exists()]


def _config() -> dict:
    return yaml.safe_load((ROOT / "_config.yml").read_text())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def site():
    if not (HTML / "index.html").exists():
        if os.environ.get("CI"):
            pytest.fail("CI must build the book (make book) before the browser tests run")
        pytest.skip("no built book: run `make book` first")
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    handler = functools.partial(_QuietHandler, directory=str(HTML))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def page(site):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        # A fresh profile per run (Playwright makes a new user-data directory for each launch).
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
        )
        tab = browser.new_page(viewport={"width": 1280, "height": 900})
        # Nothing outside the book may be needed: requests to other hosts are answered with an error.
        tab.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())
        yield tab
        browser.close()


def _open(page, site: str, name: str) -> None:
    page.goto(f"{site}/{name}.html", wait_until="load")
    page.wait_for_load_state("networkidle")


def _png_outputs(name: str) -> int:
    notebook = json.loads((EXECUTED / f"{name}.ipynb").read_text())
    return sum(
        1
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    )


@pytest.mark.parametrize("name", PAGES)
def test_page_renders_without_errors_and_with_its_figures_and_math(page, site, name):
    _open(page, site, name)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{Path(name).name}.png"), full_page=True)
    # Tracebacks are allowed only in cells that demonstrate an error on purpose.
    errors = page.locator(".cell:not(.tag_raises-exception) .output.traceback, "
                          ".cell:not(.tag_raises-exception) .output.error")
    assert errors.count() == 0, errors.first.inner_text()[:500]
    body = page.locator("article").inner_text()
    assert "Traceback (most recent call last)" not in body or page.locator(".tag_raises-exception").count()
    if name in CHAPTERS:
        expected = _png_outputs(name)
        images = page.locator(".cell_output img")
        assert images.count() >= expected, f"{name}: {images.count()} images shown, {expected} made"
        broken = page.evaluate("[...document.querySelectorAll('.cell_output img')].filter(i => !i.naturalWidth).length")
        assert broken == 0, f"{name}: {broken} images did not load"
    page.wait_for_function("() => !window.MathJax || (MathJax.startup && MathJax.startup.promise)", timeout=10_000)
    page.evaluate("() => window.MathJax && MathJax.startup.promise")
    maths = page.locator("article .math")
    for i in range(maths.count()):
        assert maths.nth(i).locator("mjx-container").count() == 1, f"{name}: math not rendered"
    assert page.locator("mjx-merror").count() == 0


@pytest.mark.parametrize("name", CHAPTERS)
def test_colab_button_opens_this_chapters_notebook(page, site, name):
    _open(page, site, name)
    repository = _config()["repository"]
    owner_repo = repository["url"].removeprefix("https://github.com/")
    expected = f"https://colab.research.google.com/github/{owner_repo}/blob/{repository['branch']}/{name}.ipynb"
    hrefs = page.eval_on_selector_all("a[href*='colab.research.google.com']", "els => els.map(e => e.href)")
    assert expected in hrefs, hrefs


def test_navigation_reaches_every_chapter(page, site):
    _open(page, site, "index")
    seen = set()
    for _ in range(len(PAGES) + 2):  # follow "next" links from the first page to the last
        seen.add(page.url.removeprefix(site + "/").removesuffix(".html"))
        following = page.locator("a.right-next")
        if not following.count():
            break
        following.first.click()
        page.wait_for_load_state("load")
    assert set(PAGES) <= seen | {"index"}, sorted(set(PAGES) - seen)
    _open(page, site, PAGES[0])
    sidebar = set(page.eval_on_selector_all("nav.bd-docs-nav a", "els => els.map(e => e.getAttribute('href'))"))
    assert all(any(Path(name).name in href for href in sidebar) for name in CHAPTERS), sidebar


def test_search_finds_a_word_from_a_chapter(page, site):
    word = "degradation"
    page.goto(f"{site}/search.html?q={quote(word)}", wait_until="load")
    page.wait_for_selector("#search-results li", timeout=20_000)
    results = " ".join(page.locator("#search-results li a").all_inner_texts()).lower()
    assert "concepts" in results, results


def test_a_widget_slider_changes_the_view_without_a_kernel(page, site):
    with_widgets = [name for name in CHAPTERS if '"application/vnd.jupyter.widget-view+json"' in
                    (EXECUTED / f"{name}.ipynb").read_text()]
    if not with_widgets:
        pytest.skip("no chapter has a widget yet")
    _open(page, site, with_widgets[0])
    page.wait_for_selector(".widget-slider .noUi-handle, .widget-slider input[type=range]", timeout=20_000)
    view = page.locator(".widget-stack, .jupyter-widgets .widget-image").first
    before = page.evaluate("[...document.querySelectorAll('.jupyter-widgets img')]"
                           ".filter(i => i.offsetParent).map(i => i.src.slice(-80)).join()")
    handle = page.locator(".widget-slider .noUi-handle").first
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.wait_for_timeout(500)
    after = page.evaluate("[...document.querySelectorAll('.jupyter-widgets img')]"
                          ".filter(i => i.offsetParent).map(i => i.src.slice(-80)).join()")
    assert view.count() and before and after and before != after
    page.screenshot(path=str(SCREENSHOTS / f"{Path(with_widgets[0]).name}-widget-moved.png"), full_page=False)


def _test_build() -> bool:
    """Whether the build on disk is a test build (smoke profile or synthetic data): book.setup then shows its
    note on every chapter; the published edition shows none."""
    return "resnet-lessons-smoke" in (EXECUTED / f"{CHAPTERS[0]}.ipynb").read_text()


@pytest.mark.parametrize("name", CHAPTERS)
def test_every_chapter_ends_with_its_own_measured_time(page, site, name):
    """Within its budget in the published edition; a test build (smoke: 30 s budgets on a shared CI machine) may
    run over, but never past the 60 s a smoke chapter may take."""
    _open(page, site, name)
    text = page.locator("article").inner_text()
    found = re.search(r"This chapter ran in (\d+) s, (within|OVER) its budget of (\d+) s", text)
    assert found, f"{name} does not show its own time"
    seconds, budget = int(found.group(1)), int(found.group(3))
    assert seconds <= (60 if _test_build() else budget), f"{name} ran {seconds} s (budget {budget} s)"


def test_the_introduction_lists_every_chapters_time_from_this_build(page, site):
    _open(page, site, PAGES[0])
    rows = page.locator("article table").last.locator("tbody tr").all_inner_texts()
    assert len(rows) == len(CHAPTERS), rows
    assert all(re.search(r"\d+ s\s+\d+ s$", row.strip()) for row in rows), rows


@pytest.mark.parametrize("name", CHAPTERS)
def test_the_edition_says_what_it_was_built_on(page, site, name):
    """A test build says so once per chapter; the real edition shows CIFAR-10, no shapes, no apology."""
    from resnet_lessons.data.synthetic import SYNTHETIC_CLASSES

    _open(page, site, name)
    text = page.locator("article").inner_text()
    assert not re.search(r"epochs?( \d+)?:\s+\d+%", text), f"{name} shows a progress bar frozen half-way"
    notes = page.locator(".resnet-lessons-smoke").count()
    if _test_build():
        assert notes == 1, f"{name}: the test-build note is shown {notes} times"
        return
    assert notes == 0 and "Not the real CIFAR-10" not in text, name
    outputs = " ".join(page.locator(".cell_output").all_inner_texts())
    shapes = [c for c in SYNTHETIC_CLASSES if re.search(rf"\b{c}\b", outputs)]
    assert not shapes, f"{name}: outputs name the synthetic classes {shapes} in the real edition"
