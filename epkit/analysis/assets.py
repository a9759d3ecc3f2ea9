"""plotly.js kept in one file that several report pages load by a relative path (``epkit report --plotly-js``)."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import quote

from plotly.offline import get_plotlyjs


def shared_plotly_js(plotly_js: str | Path, page: Path) -> str:
    """Write plotly.js to ``plotly_js`` unless it holds it already; the path a script tag of ``page`` loads it by."""
    js, code = Path(plotly_js), get_plotlyjs()
    js.parent.mkdir(parents=True, exist_ok=True)
    if not js.is_file() or js.read_text(encoding="utf-8") != code:
        js.write_text(code, encoding="utf-8")
    return quote(Path(os.path.relpath(js.resolve(), page.parent.resolve())).as_posix())
