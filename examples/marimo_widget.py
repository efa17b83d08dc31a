# The patching widget as a marimo app (offline: the bundled toy-ioi model).
#
#   marimo run examples/marimo_widget.py     # the app: Run, click cells, read the patterns
#   marimo edit examples/marimo_widget.py    # the same cells, editable
#
# marimo shows any anywidget through mo.ui.anywidget; the Python object stays the widget
# (widget.widget), so its methods work from other cells: widget.widget.run(wait=True), ...
# Driven in headless Chromium by tests/test_widget_hosts.py.

import marimo

__generated_with = "0.25.2"
app = marimo.App(width="full")


@app.cell
def _(mo):
    mo.md("""
    # Activation patching

    Type a clean and a corrupted prompt, press **Run**, and watch the heatmap fill in: each cell
    says how much of the clean answer comes back when that one activation is copied from the
    clean run into the corrupted one. Choose the component *head outputs (z)*, Run, and click a
    head cell to see its attention pattern.
    """)
    return


@app.cell
def _():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the bundled model needs no hub
    import marimo as mo

    import patchwidgets as pw

    return mo, pw


@app.cell
def _(mo, pw):
    model = pw.load_model("toy-ioi")
    widget = mo.ui.anywidget(pw.PatchingWidget(model))
    widget  # noqa: B018  (marimo shows a cell's last expression)
    return


if __name__ == "__main__":
    app.run()
