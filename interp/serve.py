"""`interp serve RUN_DIR...`: the dashboard of one or more coders from a local web server, with
each feature's data read from disk when its page is asked for, a prompt box (which features fire
on each token of a text) and a steering box (baseline and steered generations side by side).

The server is the standard library's ThreadingHTTPServer: a handful of JSON routes on 127.0.0.1
need no framework, and a dependency would add nothing the tests do not already cover. It serves
only what its routes name: the page, plotly.js, and JSON built from the runs' feature results;
no request path ever reaches the file system, so a path like `/../cfg.json` is a 404. A bad
request gets a 4xx with a message; an error in a handler gets a 500 (its traceback printed by the
server) and the server goes on. The model is loaded on the first prompt or steering request and
shared by every coder of that model; requests that run it take turns (its hooks are global).

Routes: `/` the page; `/plotly.js`; `/api/runs`; `/api/runs/<r>/index`;
`/api/runs/<r>/features/<id>`; POST `/api/runs/<r>/prompt` {"text"}; POST `/api/runs/<r>/steer`
{"feature", "prompt", "strength", "max_new_tokens"?, "samples"?}.
"""

from __future__ import annotations

import json
import re
import threading
import traceback
from dataclasses import dataclass, field
from functools import cached_property
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from plotly.offline import get_plotlyjs

from interp.dashboard import dashboard_title, feature_data, index_data, page_html
from interp.errors import BadInput, InterpError
from interp.features import FeatureResults, features_on_text, load_features
from interp.sae import load_sae
from interp.sae.base import SparseCoder

MAX_BODY = 64 * 1024
MAX_PROMPT_CHARS = 4000
MAX_NEW_TOKENS = 100
MAX_SAMPLES = 4


@dataclass
class ServedRun:
    """One coder's folder: its feature results read on demand, its coder loaded when needed."""

    run_dir: Path
    results: FeatureResults
    device: str = "cpu"

    @cached_property
    def index(self) -> bytes:
        return _json(index_data(self.results))

    @cached_property
    def coder(self) -> SparseCoder:
        return load_sae(self.run_dir, device=self.device).eval()


@dataclass
class Dashboard:
    """What the server answers from: the runs, and the models their coders read, loaded once."""

    runs: list[ServedRun]
    models: dict[str, object] = field(default_factory=dict)
    model_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def open(cls, run_dirs: list[Path], device: str = "cpu") -> Dashboard:
        if not run_dirs:
            raise BadInput("name at least one run folder to serve")
        return cls([ServedRun(Path(d), load_features(d, on_demand=True), device) for d in run_dirs])

    def model(self, run: ServedRun):
        from interp.run import coder_model

        name = run.results.coder_info["model"]
        if name not in self.models:
            self.models[name] = coder_model(run.coder, run.device)
        return self.models[name]

    def prompt(self, run: ServedRun, body: dict) -> dict:
        text = _text(body, "text")
        with self.model_lock:
            per_token = features_on_text(self.model(run), run.coder, text, top=5)
        return {"tokens": [[t.token, [[f, round(v, 3)] for f, v in t.features]] for t in per_token]}

    def steer(self, run: ServedRun, body: dict) -> dict:
        from interp.steering import GenerateConfig, add_feature, compare_generations

        prompt = _text(body, "prompt")
        new_tokens, samples = body.get("max_new_tokens", 30), body.get("samples", 2)
        if not (isinstance(new_tokens, int) and 1 <= new_tokens <= MAX_NEW_TOKENS and isinstance(samples, int) and 1 <= samples <= MAX_SAMPLES):
            raise BadInput(f"max_new_tokens must be 1 to {MAX_NEW_TOKENS} and samples 1 to {MAX_SAMPLES}")
        cfg = GenerateConfig(max_new_tokens=new_tokens, samples=samples, positions="new")
        # add_feature checks the feature id and the strength, as for every caller.
        add = add_feature(run.coder, body.get("feature"), body.get("strength"))
        with self.model_lock:
            pair = compare_generations(self.model(run), prompt, [add], cfg)
        return {"baseline": pair.baseline, "steered": pair.steered}


def _text(body: dict, key: str) -> str:
    text = body.get(key)
    if not isinstance(text, str) or not text.strip():
        raise BadInput(f"{key!r} must be a non-empty string")
    if len(text) > MAX_PROMPT_CHARS:
        raise BadInput(f"{key!r} is longer than {MAX_PROMPT_CHARS} characters")
    return text


def _json(data) -> bytes:
    return json.dumps(data, separators=(",", ":")).encode()


class NotRouted(Exception):
    """A path no route names: 404."""


_RUN = re.compile(r"^/api/runs/(\d{1,6})/(index|prompt|steer|features/(\d{1,9}))$")


def make_handler(dashboard: Dashboard) -> type[BaseHTTPRequestHandler]:
    page = page_html("interp dashboard", None).encode()
    plotly = get_plotlyjs().encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "interp"

        def log_message(self, format, *args):
            pass

        def do_GET(self):
            self._answer(self._get)

        def do_POST(self):
            self._answer(self._post)

        def _answer(self, route):
            try:
                status, kind, body = route()
            except NotRouted:
                status, kind, body = HTTPStatus.NOT_FOUND, "application/json", _json({"error": f"no such page: {self.path}"})
            except InterpError as e:
                status, kind, body = HTTPStatus.BAD_REQUEST, "application/json", _json({"error": str(e)})
            except Exception as e:  # noqa: BLE001 (a bug: the server says so, prints the traceback, and goes on)
                traceback.print_exc()
                status, kind, body = HTTPStatus.INTERNAL_SERVER_ERROR, "application/json", _json({"error": f"{type(e).__name__}: {e}"})
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def _run(self) -> tuple[ServedRun, str, int | None]:
            m = _RUN.match(self.path)
            if not m or int(m.group(1)) >= len(dashboard.runs):
                raise NotRouted
            return dashboard.runs[int(m.group(1))], m.group(2), None if m.group(3) is None else int(m.group(3))

        def _get(self):
            if self.path in ("/", "/index.html"):
                return HTTPStatus.OK, "text/html; charset=utf-8", page
            if self.path == "/plotly.js":
                return HTTPStatus.OK, "text/javascript; charset=utf-8", plotly
            if self.path == "/api/runs":
                return HTTPStatus.OK, "application/json", _json([r.results.coder_info | {"title": dashboard_title(r.results)} for r in dashboard.runs])
            run, what, feature = self._run()
            if what == "index":
                return HTTPStatus.OK, "application/json", run.index
            if feature is None or feature >= run.results.n_latents or not run.results.tensors["fires_n"][feature] > 0:
                raise NotRouted
            return HTTPStatus.OK, "application/json", _json(feature_data(run.results, feature))

        def _post(self):
            run, what, _ = self._run()
            if what not in ("prompt", "steer"):
                raise NotRouted
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 < length <= MAX_BODY:
                raise BadInput(f"a request body of 1 to {MAX_BODY} bytes is expected")
            try:
                body = json.loads(self.rfile.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise BadInput("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise BadInput("the request body must be a JSON object")
            answer = dashboard.prompt(run, body) if what == "prompt" else dashboard.steer(run, body)
            return HTTPStatus.OK, "application/json", _json(answer)

    return Handler


def make_server(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound (port 0: any free one; `server.server_address` says which), not yet serving."""
    server = ThreadingHTTPServer((host, port), make_handler(dashboard))
    server.daemon_threads = True
    return server
