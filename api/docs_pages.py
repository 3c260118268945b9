"""The API's documentation pages (/docs: Swagger UI, /redoc: ReDoc), served with no CDN.

FastAPI's own pages load Swagger UI's and ReDoc's JavaScript and CSS (and a favicon, and for
ReDoc a Google web font) from public CDNs, so on a machine without internet (an air-gapped
site, a laptop on a train, CI) they are blank. Here the same pages load everything from this
process: the assets are the ones the `fastapi-offline` package ships (swagger-ui-bundle.js,
swagger-ui.css, redoc.standalone.js, favicon.png), mounted with StaticFiles. Nothing is vendored
into this repository; upgrading that package upgrades the UIs.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from starlette.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
#: Where the UI assets are served (under the app's root path).
STATIC_PATH = "/static/api-docs"
ASSET_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")

#: Both pages may show images from this server (and data: URLs) only. ReDoc 2.x puts an <img> of
#: Redocly's logo from cdn.redoc.ly in its sidebar (it hides it if that fails to load), which
#: no option turns off: with this header the browser never asks for it, online or not.
CONTENT_SECURITY_POLICY = "img-src 'self' data:"


def install_docs(app: FastAPI) -> None:
    """Serves Swagger UI at /docs and ReDoc at /redoc from installed assets, not from a CDN.

    The app must be made with `docs_url=None, redoc_url=None` (FastAPI's CDN pages off). The
    pages need no credentials, like /openapi.json, which they read.
    """
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("make the app with docs_url=None, redoc_url=None: FastAPI's own pages load from a CDN")
    if app.openapi_url is None:
        raise ValueError("the documentation pages need the app's OpenAPI document (openapi_url is None)")
    missing = [name for name in ASSETS if not (ASSET_DIR / name).is_file()]
    if missing:
        raise RuntimeError(f"fastapi-offline ships no {', '.join(missing)} in {ASSET_DIR}")

    openapi_url = app.openapi_url
    oauth2_redirect_url = app.swagger_ui_oauth2_redirect_url
    app.mount(STATIC_PATH, StaticFiles(directory=ASSET_DIR), name="api-docs-assets")

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get(DOCS_URL, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        page = get_swagger_ui_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=base + oauth2_redirect_url if oauth2_redirect_url else None,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_js_url=f"{base}{STATIC_PATH}/swagger-ui-bundle.js",
            swagger_css_url=f"{base}{STATIC_PATH}/swagger-ui.css",
            swagger_favicon_url=f"{base}{STATIC_PATH}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page

    if oauth2_redirect_url:
        @app.get(oauth2_redirect_url, include_in_schema=False)
        async def swagger_ui_oauth2_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        page = get_redoc_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{STATIC_PATH}/redoc.standalone.js",
            redoc_favicon_url=f"{base}{STATIC_PATH}/favicon.png",
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
        return page
