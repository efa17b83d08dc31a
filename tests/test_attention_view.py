"""circuitsvis attention views rendered offline (patchwidgets.attention_view).

* the HTML never points at the network (no ``http(s)`` script source or import);
* a saved notebook keeps a few kilobytes per view and no copy of the 1.3 MB script;
* the views render in headless Chromium with every non-file request blocked (skipped when
  Chromium or playwright is missing), whether the script comes before or after the view.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pytest
import torch

from patchwidgets import attention_view

CHROMIUM = "/usr/bin/chromium"
TOKENS = ["<|endoftext|>", "When", " Mary", " and", " John", " went"]
NETWORK = re.compile(r"""(src\s*=\s*["']?\s*(https?:)?//)|(from\s*["']https?:)|(import\(\s*["']https?:)""", re.I)


def _view():
    pattern = torch.softmax(torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0)), -1).tril()
    return attention_view.attention_heads(pattern, TOKENS, head_names=["L0H0", "L0H1", "L1H5"])


def test_view_html_is_small_and_offline():
    html = _view()._repr_html_()
    assert len(html) < 10_000
    assert not NETWORK.search(html)
    assert "CircuitsVis.AttentionHeads" in html and "L1H5" in html


def test_script_is_the_bundled_one_and_fetches_nothing():
    script = attention_view.script_html()
    assert len(script) > 500_000  # the whole bundle, inline
    assert not NETWORK.search(script)
    assert script.count("</script") == 1  # only the element's own end tag


def test_one_head_and_shape_errors():
    one = attention_view.attention_heads(torch.eye(6), TOKENS)
    assert len(one.props["attention"]) == 1
    with pytest.raises(ValueError, match="attention must be"):
        attention_view.attention_heads(torch.eye(5), TOKENS)
    with pytest.raises(ValueError, match="head names"):
        attention_view.attention_heads(torch.eye(6)[None].repeat(2, 1, 1), TOKENS, head_names=["a"])


def test_markup_in_tokens_stays_data():
    view = attention_view.attention_heads(torch.eye(2), ["</script><b>x", "y"], head_names=["<i>h</i>"])
    html = view._repr_html_()
    assert "</script><b>" not in html and html.count("</script>") == 1
    assert "<i>h</i>" not in html


def test_a_saved_notebook_keeps_no_copy_of_the_script(tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("import torch\nfrom patchwidgets import attention_view\nattention_view.load()"),
        nbformat.v4.new_code_cell(f"attention_view.attention_heads(torch.eye(6), {TOKENS!r}, head_names=['L0H0'])"),
    ])
    NotebookClient(nb, timeout=120, kernel_name="python3").execute()
    loader, view = (c.outputs for c in nb.cells)
    assert len(nbformat.writes(nb)) < 30_000
    assert "circuitsvis loaded" in loader[0]["data"]["text/html"]
    assert "CircuitsVis.render" in view[0]["data"]["text/html"]


@pytest.mark.browser
@pytest.mark.parametrize("order", ["script first", "view first"])
def test_renders_in_chromium_offline(tmp_path, order):
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"{CHROMIUM} is not installed")
    playwright = pytest.importorskip("playwright.sync_api")
    view = _view()
    parts = [attention_view.script_html(), view.to_html()]
    if order == "view first":
        parts.reverse()
    page_file = tmp_path / "view.html"
    page_file.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>"
                         + "\n".join(parts) + "</body></html>", encoding="utf-8")
    requests, errors = [], []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless"])
        try:
            page = browser.new_page()

            def only_files(route):
                requests.append(route.request.url)
                if route.request.url.startswith("file:"):
                    route.continue_()
                else:
                    route.abort()

            page.route("**/*", only_files)
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(page_file.as_uri())
            page.wait_for_function(
                f"document.getElementById('{view.element_id}').innerText.includes('Head Selector')", timeout=15_000)
            text = page.inner_text(f"#{view.element_id}")
            canvases = page.eval_on_selector_all(f"#{view.element_id} canvas", "els => els.length")
        finally:
            browser.close()
    assert errors == []
    assert requests == [page_file.as_uri()], "the page asked for something other than itself"
    for name in ["L0H0", "L0H1", "L1H5"]:
        assert name in text
    assert canvases >= 1  # the zoomed heatmap is drawn on a canvas
