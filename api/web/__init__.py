"""The web pages: a server-rendered site on the API process, every asset served from here.

`install_web(app)` adds the pages (sign-in, a client's portfolio, properties and evaluations,
an admin's queue and documents), their live streams, the templates and the static files (the site's own CSS
and script, and htmx, vendored with its licence under static/vendor).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from api.web import admin_pages, client_pages, evaluation_pages, live, sign_in
from api.web.rendering import STATIC, make_templates


def install_web(app: FastAPI) -> None:
    app.state.templates = make_templates()
    app.mount("/static/web", StaticFiles(directory=str(STATIC)), name="web-static")
    app.include_router(sign_in.router)
    app.include_router(live.router)
    app.include_router(client_pages.router)
    app.include_router(evaluation_pages.router)
    app.include_router(admin_pages.router)
