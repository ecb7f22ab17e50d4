"""``gradindex serve``: one opened index behind a JSON API (FastAPI on uvicorn) and the search page.

The model and index load once; requests share them through ``service.Service`` (one cascade pass for the
queries that arrive together). Safe by default: loopback only unless a bearer token is set, bodies and
answers bounded by ``service.Limits``, every error one line of JSON (``{"error": …}``), never a traceback,
and no request names a file: the index is the one given at start.
"""


import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
from dataclasses import asdict, fields
from pathlib import Path

from .errors import GradIndexError, first_line
from .report import cards, report_page
from .search import GradIndex
from .options import TOKEN_ENV, Limits, QueryOptions
from .service import Service, parse_request
from .webpage import search_page

OPEN_PATHS = {"/", "/health", "/docs", "/openapi.json"}  # hold no index content: the page asks for the token itself
log = logging.getLogger("gradindex.server")


def _schema(many: bool) -> dict:
    """The request body's JSON schema, from ``QueryOptions`` itself (one list of options, not two)."""
    kinds = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}
    props = {f.name: {"type": next((v for k, v in kinds.items() if str(f.type).startswith(k)), "string")} for f in fields(QueryOptions)}
    text = {"type": "string"}
    if many:
        props["queries"] = {"type": "array", "items": {"type": "object", "properties": {"prompt": text, "completion": text},
                                                        "required": ["prompt", "completion"]}}
        return {"type": "object", "properties": props, "required": ["queries"]}
    return {"type": "object", "properties": {"prompt": text, "completion": text, **props}, "required": ["prompt", "completion"]}


def create_app(service: Service, token: str | None = None):
    """The ASGI app over ``service``; with ``token`` every request but the open paths needs ``Authorization: Bearer``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    index, limits = service.index, service.limits
    app = FastAPI(title="gradindex", summary="Which training sequences made the model say this?", version="1")

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), token.encode())):
                return error(401, "missing or wrong bearer token (send Authorization: Bearer TOKEN)")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limits.max_body):
            return error(413, f"request body over {limits.max_body} bytes")
        return await call_next(request)

    @app.exception_handler(GradIndexError)
    async def bad_request(request, e: GradIndexError):
        return error(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        return error(400, f"{'.'.join(map(str, first.get('loc', ())))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("request %s failed", request.url.path)
        return error(500, f"internal error: {first_line(e)}")

    async def body(request: Request):
        raw = await request.body()
        if len(raw) > limits.max_body:
            raise GradIndexError(f"request body over {limits.max_body} bytes")
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise GradIndexError(f"the request body is not valid JSON ({first_line(e)})") from None

    def answer(parsed, many: bool):
        return run_in_threadpool(service.query_many, parsed, many)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return search_page(index.root.name, index.n, QueryOptions().k)

    @app.get("/health")
    async def health():
        return {"status": "ok", "rows": index.n}

    @app.get("/info")
    async def info():
        return {"name": index.root.name, "rows": index.n, "generation": index.manifest.generation, "model": index.manifest.build.model,
                "summary": index.manifest.summary(index.root), "limits": asdict(limits),
                "batching": {"passes": service.batcher.passes, "answered": service.batcher.answered}}

    @app.post("/query", openapi_extra={"requestBody": {"content": {"application/json": {"schema": _schema(False)}}, "required": True}})
    async def query(request: Request):
        """One query: the object one line of ``gradindex query --json`` prints."""
        return (await answer(await body(request), False))[0].to_dict()

    @app.post("/query_many", openapi_extra={"requestBody": {"content": {"application/json": {"schema": _schema(True)}}, "required": True}})
    async def query_many(request: Request):
        """Several queries with one set of options: ``{"results": [...]}``."""
        return {"results": [r.to_dict() for r in await answer(await body(request), True)]}

    @app.post("/cards", openapi_extra={"requestBody": {"content": {"application/json": {"schema": _schema(False)}}, "required": True}})
    async def draw(request: Request):
        """One query, and its results drawn as the report draws them (what the page shows)."""
        result = (await answer(await body(request), False))[0]
        return {"result": result.to_dict(), "html": cards(result)}

    @app.get("/rows/{row}")
    async def row(row: int):
        """A row's whole text, its source, and the other rows holding the same text."""
        try:
            return await run_in_threadpool(service.row, row)
        except GradIndexError as e:
            return error(404, str(e))

    @app.post("/report", response_class=HTMLResponse, openapi_extra={"requestBody": {"content": {"application/json": {"schema": _schema(False)}}}})
    async def report(request: Request):
        """The self-contained HTML report of one query (proponents, opponents, sparsity), as a download."""
        queries, options = parse_request({**await body(request), "per_token": True}, limits)

        def write() -> str:
            with service.lock:
                return report_page(index, queries[0].prompt, queries[0].completion, options=options)

        return Response(await run_in_threadpool(write), media_type="text/html",
                        headers={"Content-Disposition": 'attachment; filename="gradindex-report.html"'})

    return app


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(index: str | Path, *, host: str = "127.0.0.1", port: int = 8080, token: str | None = None, limits: Limits = Limits(),
          model=None, dtype: str | None = None, device: str = "cpu") -> None:
    """Load the index and serve it until SIGTERM or Ctrl-C (requests in flight are answered first)."""
    import uvicorn

    token = token or os.environ.get(TOKEN_ENV) or None
    if not is_local(host) and token is None:
        raise GradIndexError(f"--host {host} is reachable from other machines: give --token (or set {TOKEN_ENV}) to require a bearer token")
    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        raise GradIndexError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None
    print(f"loading {index} (model, factors, FAISS index) …", file=sys.stderr, flush=True)
    service = Service(GradIndex.open(index, model=model, dtype=dtype, device=device), limits)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"serving {index} ({service.index.n:,} rows) at http://{shown}:{bound}/ (API docs at /docs; Ctrl-C or SIGTERM stops)", flush=True)
    config = uvicorn.Config(create_app(service, token), log_level="warning", timeout_graceful_shutdown=30)
    main = threading.current_thread() is threading.main_thread()
    # uvicorn shuts down gracefully on SIGTERM, then raises it again under the handler it found: make that one a
    # no-op, so that a stop by a service manager ends in exit code 0 with the batcher closed.
    previous = signal.signal(signal.SIGTERM, lambda *_: None) if main else None
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        service.close()
        if main:
            signal.signal(signal.SIGTERM, previous)
