"""Asking a running ``gradindex serve`` instead of opening the index here: the same queries, options and
typed results, with the server's one-line errors passed on as ``GradIndexError``."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from dataclasses import fields

from .data import Query
from .errors import GradIndexError
from .options import TOKEN_ENV, QueryOptions
from .results import QueryResult


def query_server(url: str, queries: list[Query], options: QueryOptions, *, token: str | None = None, timeout: float = 3600) -> list[QueryResult]:
    """``queries`` answered by the server at ``url`` (its ``/query_many``), with the options that differ from the defaults."""
    defaults = QueryOptions()
    body = {f.name: getattr(options, f.name) for f in fields(QueryOptions) if getattr(options, f.name) != getattr(defaults, f.name)}
    body["queries"] = [{"prompt": q.prompt, "completion": q.completion} for q in queries]
    return [QueryResult.from_dict(r) for r in post(url, "/query_many", body, token=token, timeout=timeout)["results"]]


def post(url: str, path: str, body: dict, *, token: str | None = None, timeout: float = 3600) -> dict:
    """POST ``body`` as JSON to ``url`` + ``path``; the decoded answer, or the server's error as one line."""
    token = token or os.environ.get(TOKEN_ENV) or None
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
    request = urllib.request.Request(url.rstrip("/") + path, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read())["error"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {e.code} {e.reason}"
        raise GradIndexError(f"server {url}: {message}") from None
    except (urllib.error.URLError, OSError) as e:
        raise GradIndexError(f"cannot reach the server at {url} ({getattr(e, 'reason', e)})") from None
