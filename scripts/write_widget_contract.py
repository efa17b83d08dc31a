"""Write tests/shared/widget_contract.json: what PatchingWidget sends its page.

The page's unit tests (js/fake_model.js) build their fake model from that file, and
tests/test_widget.py fails when it no longer matches the widget. After changing
patchwidgets/widget_contract.py or a synced traitlet of patchwidgets/widget.py, run::

    python scripts/write_widget_contract.py
"""

from __future__ import annotations

from pathlib import Path

from patchwidgets.widget import PatchingWidget
from patchwidgets.widget_contract import SHARED_FILE, shared_json

if __name__ == "__main__":
    path = Path(__file__).resolve().parent.parent / SHARED_FILE
    path.write_text(shared_json(PatchingWidget.default_state()), encoding="utf-8")
    print(f"wrote {path}")
