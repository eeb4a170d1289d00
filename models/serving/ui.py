"""A page to look at, mounted at /ui on the API service: a user's history and
recommendations (score, rank, candidate source, the version and variant that ranked them),
the served versions' metrics against the baselines with their training report PNGs, and the
drift per feature. One static page (ui.html, vanilla JS, no external resources) over the
JSON API, plus the few page-only JSON routes below that the public API has no call for.

Keys: the HTML shell (PUBLIC_PATHS) holds no data and is served without a key, so a browser
can open it; every data call (the public API and the routes below) goes through the
RequestGuard like any other request. With RECSYS_API_KEYS set, the page asks for a key,
keeps it in the tab's sessionStorage and sends it as `Authorization: Bearer <key>` on its
fetch calls; the report PNGs are fetched the same way and shown from blob URLs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from models.serving.orchestration import Ranking

UI_PATH = "/ui"
# Only the shell: "/ui" redirects to "/ui/" (the page's relative URLs need the slash).
PUBLIC_PATHS = frozenset({UI_PATH, UI_PATH + "/"})
PAGE_FILE = Path(__file__).with_name("ui.html")
MAX_USERS = 1000
MAX_HISTORY = 500
DEFAULTS = {"limit_users": 200, "limit_history": 10}


def _bad_input(field: str, rule: str, given: Any) -> JSONResponse:
    """A 400 in the shape of BentoML's validation errors."""
    detail = [{"type": "value_error", "loc": [field], "msg": f"{rule} (given: {given!r})"}]
    return JSONResponse({"error": f"{field}: {rule}", "detail": detail}, status_code=400)


def _bounded_int(request: Request, name: str, default: int, upper: int) -> int | JSONResponse:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        return _bad_input(name, f"must be an integer from 1 to {upper}", raw)
    if not 1 <= value <= upper:
        return _bad_input(name, f"must be an integer from 1 to {upper}", raw)
    return value


def ui_app(ranking: Callable[[], Ranking]) -> Starlette:
    """The page's ASGI app. `ranking` gives the worker's Ranking once the service runs (the
    mounted app is built at import, before any service instance exists)."""
    page = PAGE_FILE.read_text(encoding="utf-8")

    async def shell(request: Request) -> Response:
        return HTMLResponse(page, headers={"cache-control": "no-cache"})

    async def users(request: Request) -> Response:
        limit = _bounded_int(request, "limit", DEFAULTS["limit_users"], MAX_USERS)
        if isinstance(limit, JSONResponse):
            return limit
        ids = ranking().champion.recommender.tables.user_ids
        return JSONResponse({"users": ids[:limit].tolist(), "total": len(ids)})

    async def history(request: Request) -> Response:
        user_id = request.query_params.get("user_id", "")
        if not user_id:
            return _bad_input("user_id", "is required (a user id, a string)", user_id)
        limit = _bounded_int(request, "limit", DEFAULTS["limit_history"], MAX_HISTORY)
        if isinstance(limit, JSONResponse):
            return limit
        # The tables of the version that ranks this user (split mode may pick the challenger).
        rec = ranking().variant_for(user_id).recommender
        user = rec.user_index(user_id)
        seen = rec.tables.history(user) if user is not None else np.zeros(0, dtype=np.int32)
        recent = seen[::-1][:limit]  # most recent first
        rows = rec.describe(recent, None)
        items = [{k: row[k] for k in ("item_id", "title", "genres")} for row in rows]
        return JSONResponse(
            {"user_id": user_id, "known": user is not None, "total": len(seen), "items": items}
        )

    async def reports(request: Request) -> Response:
        """The report PNGs each served version holds (whatever training wrote there)."""
        return JSONResponse({
            v.role: {"tag": v.tag, "files": sorted(p.name for p in Path(v.version.path).glob("*.png"))}
            for v in ranking().variants
        })  # fmt: skip

    async def report_file(request: Request) -> Response:
        role, name = request.path_params["role"], request.path_params["name"]
        variants = {v.role: v for v in ranking().variants}
        if role not in variants:
            return _bad_input("role", f"must be one of {sorted(variants)}", role)
        folder = Path(variants[role].version.path)
        # Only names listed in the folder: a path from the URL never reaches the file system.
        files = {p.name: p for p in folder.glob("*.png")}
        if name not in files:
            return JSONResponse({"error": f"no report {name!r} in {variants[role].tag}; "
                                 f"valid names: {sorted(files)}"}, status_code=404)  # fmt: skip
        return FileResponse(files[name], media_type="image/png")

    return Starlette(routes=[
        Route("/", shell),
        Route("/api/users", users),
        Route("/api/history", history),
        Route("/api/reports", reports),
        Route("/api/reports/{role}/{name}", report_file),
    ])  # fmt: skip
