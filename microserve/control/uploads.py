"""What `PUT /admin/strategy` and `PUT /admin/planner` load: a file on the router's host, or Python
in the request body (only with `--allow-code-upload`, refused before any of it is written or run)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web


def error(status: int, message: str) -> web.Response:
    """The admin API's error JSON."""
    return web.json_response({"error": {"message": message, "type": "admin_error"}}, status=status)


def load_file(body: dict[str, Any], kind: str, load, errors: tuple, allow_code_upload: bool) -> tuple[Any, str]:
    """The strategy or planner a PUT names, and where from: `{"path"}` on the router's host, or
    `{"source"}` only with --allow-code-upload (refused before any of it is written or run). On
    failure: (the error response, "")."""
    args = body.get("args") or {}
    if "source" in body and not allow_code_upload:
        return error(403, f"{kind} source in a request body is refused: give {{\"path\": FILE}} on the router's "
                     "host, or start the gateway with --allow-code-upload"), ""
    try:
        if isinstance(body.get("source"), str):
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{kind}_from_admin.py"
                path.write_text(body["source"])
                return load(path, args), "(uploaded)"
        if isinstance(body.get("path"), str):
            return load(body["path"], args), body["path"]
        return error(400, f"PUT /admin/{kind} needs {{\"path\": FILE}} or {{\"source\": PYTHON}}"), ""
    except errors as exc:
        return error(400, f"cannot load the {kind}: {exc}"), ""
