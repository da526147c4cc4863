"""The gateway: the OpenAI-compatible API in front of vLLM, and the only writer of the store.

Routes are thin: they check the request (loop.protocol), resolve the model (loop.router), and
hand the rest to `Gateway`, which forwards to the engine, logs the exchange through the batched
writer (loop.log_writer), offers it to the pair maker (loop.pair_maker), and counts it
(loop.metrics). Versions are promoted and rolled back through loop.versions.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from loop import dashboard
from loop.config import Config
from loop.engine import KEEP_ALIVE_S, Engine
from loop.log_writer import LogWriter
from loop.metrics import Metrics
from loop.pair_maker import PairJob, PairMaker
from loop.protocol import ChatRequest, CompletionRequest, FeedbackRequest, error, validation_message
from loop.router import Router, UnknownModel
from loop.versions import VersionError, Versions
from store import export
from store.database import Exchange, Store, StoreError
from store.labelling import LabelConflict, LabelQueue
from store.reward_models import RewardModels
from store.runs import RunBusy, Runs

DEFAULT_GUIDELINES = """\
Pick the reply you would rather receive.

- **Better**: answers the question that was asked, correctly, and politely.
- **Tie**: both are about equally good.
- **Both bad**: neither answers the question, or both are rude or wrong.
- **Skip**: you cannot judge this one (say why in the rationale if you can).
"""


TOKEN_CACHE_S = 5.0  # a new or rotated token works at once; an old one stops within this


class HTTPProblem(Exception):
    """An error answer in OpenAI's shape, raised from anywhere below a route."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)

    def response(self) -> JSONResponse:
        return error(self.status, self.message, self.type, self.param, self.code, self.headers)


@dataclass
class Gateway:
    cfg: Config
    store: Store
    router: Router
    versions: Versions
    engine: Engine | None                       # None: someone else runs the engine (tests, benchmarks)
    engine_url: str
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0

    def __post_init__(self) -> None:
        g = self.cfg.gateway
        self.writer = LogWriter(self.store, flush_ms=g.log_flush_ms, max_queue=g.log_max_queue)
        self.http = httpx.AsyncClient(base_url=self.engine_url, timeout=httpx.Timeout(g.request_timeout_s, connect=5.0),
                                      limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
        self.pairs = PairMaker(self.router, self.http, self.writer.put, lambda: self.in_flight, g.pair_share)
        self.queue = LabelQueue(self.store, self.cfg.labeling.overlap, self.cfg.labeling.lease_s)
        self.runs = Runs(self.store)
        self.reward_models = RewardModels(self.store)
        self._token_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self._session: aiohttp.ClientSession | None = None

    def user_by_token(self, token: str) -> dict[str, Any] | None:
        """The token's user, cached for a few seconds: every /v1 request carries a key, and the
        store's lock is better left to the writer."""
        now = time.monotonic()
        hit = self._token_cache.get(token)
        if hit and hit[0] > now:
            return hit[1]
        user = self.store.user_by_token(token)
        if len(self._token_cache) > 10_000:
            self._token_cache.clear()
        self._token_cache[token] = (now + TOKEN_CACHE_S, user)
        return user

    def session(self) -> aiohttp.ClientSession:
        """The hot path's client (aiohttp: measured ~1-2 ms a request faster than httpx here); made
        lazily because it must be made inside the running event loop."""
        if self._session is None:
            g = self.cfg.gateway
            self._session = aiohttp.ClientSession(
                base_url=self.engine_url, connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=KEEP_ALIVE_S - 15),
                timeout=aiohttp.ClientTimeout(total=g.request_timeout_s, sock_connect=5.0))
        return self._session

    # --- requests to the engine --------------------------------------------------------------

    def engine_ready(self) -> bool:
        return self.engine.ready.is_set() if self.engine else True

    def unavailable(self, why: str) -> HTTPProblem:
        print(f"alignloop gateway: 503 to a client: the engine is unavailable ({why})", file=sys.stderr, flush=True)
        return HTTPProblem(503, f"the model engine is unavailable ({why}); retry shortly", "service_unavailable",
                           code="engine_unavailable", headers={"Retry-After": str(self.cfg.gateway.retry_after_s)})

    def route(self, model: str, max_tokens: int | None) -> tuple[int, str]:
        limit = self.cfg.engine.max_model_len
        if max_tokens is not None and max_tokens >= limit:
            raise HTTPProblem(400, f"max_tokens is {max_tokens}, but this model's context is {limit} tokens "
                                   "(prompt and completion together)", param="max_tokens")
        try:
            version, engine_model = self.router.resolve(model)
        except UnknownModel:
            raise HTTPProblem(404, f"the model {model!r} does not exist; available: {', '.join(self.router.names())}",
                              param="model", code="model_not_found") from None
        if not self.engine_ready():
            raise self.unavailable("starting or restarting")
        return version, engine_model

    async def complete(self, endpoint: str, path: str, req: ChatRequest | CompletionRequest, body: dict[str, Any],
                       user_id: int | None) -> Response:
        version, engine_model = self.route(req.model, req.max_tokens or req.max_completion_tokens)
        upstream = {**body, "model": engine_model}
        upstream.pop("priority", None)  # live traffic keeps the default, highest priority
        messages = ([m.model_dump(include={"role", "content"}) for m in req.messages] if isinstance(req, ChatRequest)
                    else [{"role": "user", "content": req.prompt}])
        if req.stream:
            upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        started = time.perf_counter()
        self.in_flight += 1
        try:
            r = await self.session().post(path, json=upstream)
        except TimeoutError:
            self.in_flight -= 1
            raise HTTPProblem(504, "the model engine did not answer in time", "timeout") from None
        except aiohttp.ClientError as e:
            self.in_flight -= 1
            raise self.unavailable(type(e).__name__) from None
        if r.status >= 400:
            self.in_flight -= 1
            text = await r.read()
            r.release()
            self.metrics.requests.labels(endpoint, str(r.status)).inc()
            if r.status >= 500:
                raise self.unavailable(f"engine answered {r.status}: {text[:300]!r}")
            return Response(text, status_code=r.status, media_type="application/json")
        record = Exchange(request_id="", endpoint=endpoint, model_requested=req.model, version_id=version,
                          messages=messages, choices=[], sampling=req.sampling(), user_id=user_id)
        if req.stream:
            return StreamingResponse(self._relay(r, record, started, body), media_type="text/event-stream")
        try:
            data = json.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as e:
            raise self.unavailable(f"broken answer: {type(e).__name__}") from None
        finally:
            r.release()
            self.in_flight -= 1
        data["model"] = req.model
        record.request_id = data["id"]
        record.choices = [(_choice_text(c), c.get("finish_reason")) for c in sorted(data["choices"], key=lambda c: c["index"])]
        self._finish(record, data.get("usage"), started)
        return JSONResponse(data)

    async def _relay(self, r: aiohttp.ClientResponse, record: Exchange, started: float,
                     body: dict) -> AsyncIterator[bytes]:
        """Pass the engine's server-sent events through, renaming the model; log the whole answer."""
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage = None
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        try:
            async for raw in r.content:
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    if line:
                        yield f"{line}\n\n".encode()
                    continue
                chunk = json.loads(line[6:])
                record.request_id = record.request_id or chunk.get("id", "")
                chunk["model"] = record.model_requested
                for c in chunk.get("choices", []):
                    delta = c.get("delta") or {}
                    texts.setdefault(c["index"], []).append(delta.get("content") or c.get("text") or "")
                    if c.get("finish_reason"):
                        finish[c["index"]] = c["finish_reason"]
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    if not chunk.get("choices") and not wants_usage:
                        continue  # the usage chunk the gateway asked for, not the client
                    if not wants_usage:
                        chunk.pop("usage")
                yield f"data: {json.dumps(chunk)}\n\n".encode()
        except (aiohttp.ClientError, TimeoutError):
            err = {"error": {"message": "the model engine stopped mid-answer", "type": "service_unavailable"}}
            yield f"data: {json.dumps(err)}\n\n".encode()
            record.status = 503
        finally:
            r.release()
            self.in_flight -= 1
        record.choices = [("".join(texts[i]), finish.get(i)) for i in sorted(texts)]
        self._finish(record, usage, started)

    def _finish(self, record: Exchange, usage: dict | None, started: float) -> None:
        elapsed = time.perf_counter() - started
        record.latency_ms = elapsed * 1000
        if usage:
            record.prompt_tokens, record.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
            self.metrics.tokens.labels("prompt").inc(record.prompt_tokens or 0)
            self.metrics.tokens.labels("completion").inc(record.completion_tokens or 0)
        self.metrics.requests.labels(record.endpoint, str(record.status)).inc()
        self.metrics.latency.labels(record.endpoint).observe(elapsed)
        if not record.request_id:
            return
        self.writer.put(record)
        if record.endpoint == "chat.completions" and record.status == 200 and record.choices:
            max_tokens = record.sampling.get("max_tokens") or record.sampling.get("max_completion_tokens")
            self.pairs.offer(PairJob(record.request_id, record.messages, record.version_id, max_tokens))

    # --- feedback ----------------------------------------------------------------------------

    def feedback(self, req: FeedbackRequest, user_id: int | None) -> int:
        if (req.thumbs is None) == (req.score is None):
            raise HTTPProblem(400, "give exactly one of 'thumbs' ('up' or 'down') and 'score' (0 to 1)")
        response_id = self.store.response_id(req.id, req.choice)
        if response_id is None:  # maybe still in the writer's queue
            self.writer.flush()
            response_id = self.store.response_id(req.id, req.choice)
        if response_id is None:
            raise HTTPProblem(404, f"no response {req.id!r} with choice {req.choice}", param="id", code="not_found")
        kind, value = ("thumbs", 1.0 if req.thumbs == "up" else 0.0) if req.thumbs else ("score", float(req.score))
        self.metrics.feedback.labels(kind).inc()
        return self.store.add_feedback(response_id, kind, value, req.comment, user_id)

    async def arena(self, messages: list[dict[str, str]], max_tokens: int, user_id: int) -> dict[str, Any]:
        """Two live answers to one prompt, as a new pair handed to this labeller: serving vs the canary
        (or the previous version), else two samples of what serves."""
        if not self.engine_ready():
            raise self.unavailable("starting or restarting")
        r = self.router.routes
        other = r.canary if r.canary is not None else (r.previous if r.previous in r.engine_names else r.serving)

        async def answer(version: int, seed: int) -> tuple[str, int]:
            body = {"model": r.engine_name(version), "messages": messages, "max_tokens": max_tokens,
                    "temperature": 1.0, "seed": seed}
            try:
                resp = await self.http.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as e:
                raise self.unavailable(type(e).__name__) from None
            if resp.status_code >= 400:
                raise HTTPProblem(resp.status_code if resp.status_code < 500 else 503, resp.text)
            return resp.json()["choices"][0]["message"]["content"] or "", version

        for attempt in range(3):  # two samples can come out the same; try again with other seeds
            a, b = await asyncio.gather(answer(r.serving, 2 * attempt), answer(other, 2 * attempt + 1))
            pair_id = await asyncio.to_thread(self.store.add_generated_pair, messages, a, b, "arena", 2)
            if pair_id is not None:
                return await asyncio.to_thread(self.queue.lease, user_id, pair_id)
        raise HTTPProblem(409, "both answers came out the same three times; try another prompt")

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        """Answers from one version to many prompts, for evaluation: not logged, no pairs made,
        behind live traffic in the engine's queue."""
        try:
            engine_model = await asyncio.to_thread(self.versions.load, req.model)
        except VersionError as e:
            raise HTTPProblem(404, str(e), code="model_not_found") from None
        if not self.engine_ready():
            raise self.unavailable("starting or restarting")
        limit = asyncio.Semaphore(16)

        async def one(i: int, messages: list[dict[str, str]]) -> dict[str, Any]:
            body = {"model": engine_model, "messages": messages, "max_tokens": req.max_tokens,
                    "temperature": req.temperature, "seed": req.seed + i, "priority": 5}
            async with limit:
                r = await self.http.post("/v1/chat/completions", json=body)
            if r.status_code >= 400:
                raise HTTPProblem(r.status_code if r.status_code < 500 else 503, r.text)
            data = r.json()
            return {"text": data["choices"][0]["message"]["content"] or "",
                    "completion_tokens": data["usage"]["completion_tokens"]}

        try:
            answers = await asyncio.gather(*(one(i, m) for i, m in enumerate(req.prompts)))
        except httpx.HTTPError as e:
            raise self.unavailable(type(e).__name__) from None
        return {"model": req.model, "answers": answers}

    def status(self) -> dict[str, Any]:
        r = self.router.routes
        return {"alias": r.alias, "serving": r.serving, "previous": r.previous, "canary": r.canary,
                "canary_share": r.canary_share, "models": self.router.names(),
                "engine": {"ready": self.engine_ready(), "url": self.engine_url,
                           "pid": self.engine.pid if self.engine else None,
                           "restarts": self.engine.restarts if self.engine else 0},
                "log_queue": self.writer.depth, "log_dropped": self.writer.dropped,
                "pair_queue": self.pairs.queue.qsize(), "pairs_made": self.writer.pairs_made,
                "counts": self.store.counts()}

    def render_metrics(self) -> bytes:
        m = self.metrics
        m.in_flight.set(self.in_flight)
        m.log_queue.set(self.writer.depth)
        m.log_dropped.set(self.writer.dropped)
        m.pair_queue.set(self.pairs.queue.qsize())
        m.serving.set(self.router.routes.serving)
        m.engine_up.set(1 if self.engine_ready() else 0)
        m.engine_restarts.set(self.engine.restarts if self.engine else 0)
        return m.render()

    async def close(self) -> None:
        await self.http.aclose()
        if self._session is not None:
            await self._session.close()
        self.writer.stop()
        self.versions.close()


def _choice_text(choice: dict) -> str:
    if "message" in choice:
        return choice["message"].get("content") or ""
    return choice.get("text") or ""


# --- HTTP routes ---------------------------------------------------------------------------------

class PromoteRequest(BaseModel):
    version: str | int
    reason: str | None = None


class CanaryRequest(BaseModel):
    version: str | int | None
    share: float = 0.1


class LabelRequest(BaseModel):
    pair_id: int
    choice: Literal["first", "second", "tie", "both_bad", "skip"]
    rationale: str | None = Field(default=None, max_length=500)
    seconds: float | None = Field(default=None, ge=0)


class ArenaRequest(BaseModel):
    prompt: str = Field(min_length=1, max_length=4000)
    max_tokens: int = Field(default=64, ge=1, le=1024)


class GuidelinesRequest(BaseModel):
    text: str = Field(max_length=100_000)


class RunStart(BaseModel):
    method: str
    trigger: str = "manual"
    config: dict | None = None


class RunMetrics(BaseModel):
    metrics: list[dict[str, Any]] = []


class RunFinish(BaseModel):
    status: Literal["promoted", "rejected", "failed", "skipped"]
    reason: str | None = None
    metrics: dict | None = None
    candidate_version_id: int | None = None
    snapshot_hash: str | None = None


class RewardModelIn(BaseModel):
    path: str
    run_id: int | None = None
    base_model: str | None = None
    snapshot_hash: str | None = None
    accuracy: float | None = None
    metrics: dict | None = None


class GenerateRequest(BaseModel):
    model: str
    prompts: list[list[dict[str, str]]] = Field(min_length=1, max_length=2048)
    max_tokens: int = Field(default=64, ge=1)
    temperature: float = Field(default=0.7, ge=0, le=2)
    seed: int = 0


class RetrainRequest(BaseModel):
    method: Literal["dpo", "ppo", "kto"] | None = None
    force: bool = False


class StatusRequest(BaseModel):
    status: Literal["candidate", "rejected", "failed", "retired"]


class UserRequest(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    role: Literal["labeller", "admin"]


class VersionRequest(BaseModel):
    adapter_path: str
    method: str
    parent_id: int | None = None
    snapshot_hash: str | None = None
    config: dict | None = None
    metrics: dict | None = None


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HTTPProblem(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the request body must be a JSON object")
    return body


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        message, param = validation_message(e)
        raise HTTPProblem(400, message, param=param) from None


def create_app(gw: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        pair_task = asyncio.create_task(gw.pairs.run())
        yield
        pair_task.cancel()
        await gw.close()

    app = FastAPI(title="alignloop gateway", lifespan=lifespan)
    app.state.gateway = gw

    @app.exception_handler(HTTPProblem)
    async def _problem(request: Request, exc: HTTPProblem) -> JSONResponse:
        return exc.response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        traceback.print_exception(exc)
        return error(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]))

    def user(request: Request) -> dict[str, Any] | None:
        """Who sent the request, if the token is a user's; None without a token."""
        header = request.headers.get("authorization", "")
        if not header:
            return None
        token = header.removeprefix("Bearer ").strip()
        found = gw.user_by_token(token) if token else None
        if found is None:
            raise HTTPProblem(401, "unknown or malformed token", "authentication_error")
        return found

    def api_user(request: Request) -> dict[str, Any] | None:
        """For /v1: OpenAI clients always send some API key; an unknown one is anonymous unless
        `gateway.require_api_key` is on."""
        try:
            who = user(request)
        except HTTPProblem:
            who = None
        if who is None and gw.cfg.gateway.require_api_key:
            raise HTTPProblem(401, "send a user's token as the API key ('Authorization: Bearer <token>')",
                              "authentication_error")
        return who

    def signed_in(request: Request) -> dict[str, Any]:
        who = user(request)
        if who is None:
            raise HTTPProblem(401, "sign in: send 'Authorization: Bearer <token>'", "authentication_error")
        return who

    def admin(request: Request) -> dict[str, Any]:
        who = signed_in(request)
        if who["role"] != "admin":
            raise HTTPProblem(403, f"{who['name']} is a {who['role']}; this needs an admin", "permission_error")
        return who

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, who=Depends(api_user)) -> Response:
        body = await _json_body(request)
        req = _parse(ChatRequest, body)
        return await gw.complete("chat.completions", "/v1/chat/completions", req, body, who and who["id"])

    @app.post("/v1/completions")
    async def completions(request: Request, who=Depends(api_user)) -> Response:
        body = await _json_body(request)
        req = _parse(CompletionRequest, body)
        return await gw.complete("completions", "/v1/completions", req, body, who and who["id"])

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "owned_by": "alignloop"}
                                           for name in gw.router.names()]}

    @app.post("/v1/feedback")
    async def feedback(request: Request, who=Depends(api_user)) -> dict[str, Any]:
        req = _parse(FeedbackRequest, await _json_body(request))
        feedback_id = await asyncio.to_thread(gw.feedback, req, who and who["id"])
        return {"id": feedback_id, "object": "feedback", "status": "recorded"}

    @app.get("/healthz")
    async def healthz() -> Response:
        ready = gw.engine_ready()
        body = {"status": "ok" if ready else "engine_unavailable", "engine_ready": ready,
                "serving": gw.router.routes.serving}
        return JSONResponse(body, status_code=200 if ready else 503,
                            headers=None if ready else {"Retry-After": str(gw.cfg.gateway.retry_after_s)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gw.render_metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/api/me")
    async def me(who=Depends(signed_in)) -> dict[str, Any]:
        return who

    @app.get("/api/label/next")
    async def next_pair(response: Response, who=Depends(signed_in)) -> dict[str, Any]:
        started = time.perf_counter()
        pair = await asyncio.to_thread(gw.queue.next_pair, who["id"])
        response.headers["Server-Timing"] = f"next;dur={(time.perf_counter() - started) * 1000:.2f}"
        return {"pair": pair, "progress": await asyncio.to_thread(gw.queue.progress, who["id"])}

    @app.post("/api/label")
    async def label(body: LabelRequest, response: Response, who=Depends(signed_in)) -> dict[str, Any]:
        try:
            label_id = await asyncio.to_thread(gw.queue.submit, who["id"], body.pair_id, body.choice,
                                               body.rationale, body.seconds)
        except LabelConflict as e:
            raise HTTPProblem(409, str(e), code="conflict") from None
        except StoreError as e:
            raise HTTPProblem(404, str(e), code="not_found") from None
        gw.metrics.labels.inc()
        started = time.perf_counter()
        pair = await asyncio.to_thread(gw.queue.next_pair, who["id"])  # the next one, in the same round trip
        response.headers["Server-Timing"] = f"next;dur={(time.perf_counter() - started) * 1000:.2f}"
        return {"label_id": label_id, "pair": pair, "progress": await asyncio.to_thread(gw.queue.progress, who["id"])}

    @app.post("/api/label/undo")
    async def undo(who=Depends(signed_in)) -> dict[str, Any]:
        pair = await asyncio.to_thread(gw.queue.undo, who["id"])
        if pair is None:
            raise HTTPProblem(404, "nothing to undo", code="not_found")
        return {"pair": pair, "progress": await asyncio.to_thread(gw.queue.progress, who["id"])}

    @app.post("/api/arena")
    async def arena(body: ArenaRequest, who=Depends(signed_in)) -> dict[str, Any]:
        pair = await gw.arena([{"role": "user", "content": body.prompt}], body.max_tokens, who["id"])
        return {"pair": pair, "progress": await asyncio.to_thread(gw.queue.progress, who["id"])}

    @app.get("/api/stats")
    async def stats(who=Depends(signed_in)) -> dict[str, Any]:
        return await asyncio.to_thread(dashboard.stats, gw.store, gw.queue)

    @app.get("/api/export/{kind}")
    async def export_kind(kind: Literal["pairs", "prompts", "feedback"], format: Literal["jsonl", "parquet"] = "jsonl",
                          who=Depends(admin)) -> Response:
        """The same export as `alignloop export KIND`, as a download; its manifest in a header."""
        def run() -> tuple[bytes, str]:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{kind}.{format}"
                manifest = export.export(gw.store, kind, path, format, gw.cfg.store.heldout_share)
                return path.read_bytes(), json.dumps(asdict(manifest))

        data, manifest = await asyncio.to_thread(run)
        media = "application/x-ndjson" if format == "jsonl" else "application/vnd.apache.parquet"
        return Response(data, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="{kind}.{format}"', "X-Alignloop-Manifest": manifest})

    @app.post("/api/generate")
    async def generate(body: GenerateRequest, who=Depends(admin)) -> dict[str, Any]:
        return await gw.generate(body)

    @app.post("/api/snapshot")
    async def snapshot(who=Depends(admin)) -> dict[str, Any]:
        """Export everything labelled so far to a new snapshot folder for a retrain run."""
        def run() -> dict[str, Any]:
            out = gw.cfg.data_dir / "snapshots" / time.strftime("%Y%m%d-%H%M%S")
            while out.exists():
                out = out.with_name(out.name + "-1")
            manifest = export.snapshot(gw.store, out, gw.cfg.store.heldout_share)
            return {"dir": str(out), "manifest": asdict(manifest)}

        return await asyncio.to_thread(run)

    @app.post("/api/runs")
    async def start_run(body: RunStart, who=Depends(admin)) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(gw.runs.start, body.method, body.trigger, body.config)
        except RunBusy as e:
            raise HTTPProblem(409, str(e), code="run_in_progress") from None

    @app.get("/api/runs")
    async def list_runs(who=Depends(admin)) -> list[dict[str, Any]]:
        return await asyncio.to_thread(gw.store.runs)

    @app.post("/api/runs/{run_id}/heartbeat")
    async def heartbeat(run_id: int, body: RunMetrics, who=Depends(admin)) -> dict[str, Any]:
        try:
            await asyncio.to_thread(gw.runs.heartbeat, run_id, body.metrics)
        except StoreError as e:
            raise HTTPProblem(409, str(e)) from None
        return {"ok": True}

    @app.post("/api/runs/{run_id}/finish")
    async def finish_run(run_id: int, body: RunFinish, who=Depends(admin)) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(gw.runs.finish, run_id, **body.model_dump())
        except StoreError as e:
            raise HTTPProblem(409, str(e)) from None

    @app.post("/api/reward_models")
    async def add_reward_model(body: RewardModelIn, who=Depends(admin)) -> dict[str, Any]:
        return await asyncio.to_thread(gw.reward_models.add, **body.model_dump())

    @app.get("/api/reward_models")
    async def list_reward_models(who=Depends(admin)) -> list[dict[str, Any]]:
        return await asyncio.to_thread(gw.reward_models.list)

    @app.post("/api/retrain")
    async def retrain(body: RetrainRequest, who=Depends(admin)) -> dict[str, Any]:
        """Start `alignloop retrain` in the background (it refuses to run beside another run)."""
        cmd = [sys.executable, "-m", "loop.cli"]
        if gw.cfg.path:
            cmd += ["--config", str(gw.cfg.path)]
        cmd += ["retrain", "--trigger", f"button:{who['name']}"]
        if body.method:
            cmd += ["--method", body.method]
        if body.force:
            cmd.append("--force")
        log = gw.cfg.data_dir / "logs" / f"retrain-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, cwd=gw.cfg.root)
        return {"started": True, "pid": proc.pid, "log": str(log)}

    @app.post("/api/versions/{ref}/status")
    async def set_status(ref: str, body: StatusRequest, who=Depends(admin)) -> dict[str, Any]:
        try:
            version = await asyncio.to_thread(gw.store.version, ref)
        except StoreError as e:
            raise HTTPProblem(404, str(e)) from None
        if version["id"] == gw.router.routes.serving:
            raise HTTPProblem(400, f"{version['name']} is serving; promote another version first")
        await asyncio.to_thread(gw.store.set_version_status, version["id"], body.status)
        return await asyncio.to_thread(gw.store.version, version["id"])

    @app.get("/api/guidelines")
    async def guidelines(who=Depends(signed_in)) -> dict[str, Any]:
        return {"text": await asyncio.to_thread(gw.store.setting, "guidelines", DEFAULT_GUIDELINES)}

    @app.put("/api/guidelines")
    async def set_guidelines(body: GuidelinesRequest, who=Depends(admin)) -> dict[str, Any]:
        await asyncio.to_thread(gw.store.set_setting, "guidelines", body.text, who["name"])
        return {"text": body.text}

    @app.post("/api/users")
    async def add_user(body: UserRequest, who=Depends(admin)) -> dict[str, Any]:
        try:
            token = await asyncio.to_thread(gw.store.add_user, body.name, body.role)
        except StoreError as e:
            raise HTTPProblem(400, str(e)) from None
        return {"name": body.name, "role": body.role, "token": token}

    @app.post("/api/users/{name}/token")
    async def new_token(name: str, who=Depends(admin)) -> dict[str, Any]:
        try:
            token = await asyncio.to_thread(gw.store.new_token, name)
        except StoreError as e:
            raise HTTPProblem(404, str(e), code="not_found") from None
        return {"name": name, "token": token}

    @app.get("/api/status")
    async def status(who=Depends(admin)) -> dict[str, Any]:
        return await asyncio.to_thread(gw.status)

    @app.get("/api/exchanges")
    async def exchanges(limit: int = 100, who=Depends(admin)) -> list[dict[str, Any]]:
        await asyncio.to_thread(gw.writer.flush)
        return await asyncio.to_thread(gw.store.exchanges, min(max(limit, 1), 10_000))

    @app.get("/api/versions")
    async def versions(who=Depends(admin)) -> list[dict[str, Any]]:
        return await asyncio.to_thread(gw.store.versions)

    @app.post("/api/versions")
    async def add_version(body: VersionRequest, who=Depends(admin)) -> dict[str, Any]:
        return await asyncio.to_thread(gw.store.add_version, **body.model_dump())

    @app.post("/api/promote")
    async def promote(body: PromoteRequest, who=Depends(admin)) -> dict[str, Any]:
        return await _version_call(gw.versions.promote, body.version, actor=who["name"], reason=body.reason)

    @app.post("/api/rollback")
    async def rollback(who=Depends(admin)) -> dict[str, Any]:
        return await _version_call(gw.versions.rollback, actor=who["name"])

    @app.post("/api/canary")
    async def canary(body: CanaryRequest, who=Depends(admin)) -> dict[str, Any]:
        return await _version_call(gw.versions.set_canary, body.version, body.share)

    return app


async def _version_call(fn, *args, **kwargs) -> dict[str, Any]:
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except (VersionError, StoreError) as e:
        raise HTTPProblem(400, str(e)) from None
