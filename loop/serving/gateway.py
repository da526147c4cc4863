"""The gateway's state and its hot path: a live request in, the engine's answer out, logged.

`Gateway` holds what every route shares (config, store, router, versions, the replicas and an
HTTP session to each, the log writer, the pair maker, the metrics). Its hot path, top to bottom:

    route()     check max_tokens, resolve the model name to (version, engine model name)
    complete()  forward to the least loaded ready replica (one aiohttp session each); errors become
                OpenAI-shaped
    Relay       (streams) pass the engine's events through, collecting the whole answer
    _finish()   count it, hand the exchange to the batched writer, offer it to the pair maker

Logging and pair making happen off the request path (loop.serving.log_writer, pair_maker).
"""

from __future__ import annotations

import re
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from fastapi.responses import Response

from loop.config import Config
from loop.evaluation import active
from loop.sections import METHODS
from loop.serving.engine import Replica
from loop.serving.label_batcher import LabelBatcher
from loop.serving.log_writer import LogWriter
from loop.serving.metrics import Metrics
from loop.serving.monitor import Monitor
from loop.serving.pair_maker import PairJob, PairMaker
from loop.serving.protocol import ChatRequest, CompletionRequest, FeedbackRequest, HTTPProblem, engine_refusal
from loop.serving.relay import Relay
from loop.serving.replicas import Replicas
from loop.serving.router import Router, UnknownModel
from loop.serving.versions import Versions
from loop.vllm_server import KEEP_ALIVE_S
from store.database import Exchange, Store
from store.labelling import LabelQueue
from store.reward_models import RewardModels
from store.runs import Runs

VERSION_NAME = re.compile(r"v[0-9]+")  # the store's names for versions ("v3")


@dataclass
class Gateway:
    cfg: Config
    store: Store
    router: Router
    versions: Versions
    replicas: Replicas                           # none at all: a gateway for labelling only (tests, benchmarks)
    metrics: Metrics = field(default_factory=Metrics)
    in_flight: int = 0                           # live requests (the pair maker waits for none)

    def __post_init__(self) -> None:
        g = self.cfg.gateway
        self.writer = LogWriter(self.store, flush_ms=g.log_flush_ms, max_queue=g.log_max_queue)
        novelty = self.store.pairs_per_prompt() if self.cfg.labeling.order == "active" else None
        self.pairs = PairMaker(self.router, self.engine_json, self.writer.put, lambda: self.in_flight, g.pair_share,
                               novelty=novelty)
        self.queue = LabelQueue(self.store, self.cfg.labeling.overlap, self.cfg.labeling.lease_s,
                                self.cfg.labeling.gold_share, self.cfg.labeling.order)
        self.labels = LabelBatcher(self.queue, self.cfg.labeling.max_batch)
        self.runs = Runs(self.store)
        self.reward_models = RewardModels(self.store)
        self.monitor = Monitor(self.cfg.monitor, self.store, self.router, self.versions, self.engine_ready)
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def session(self, replica: Replica) -> aiohttp.ClientSession:
        """The HTTP client to one replica (aiohttp: measured ~1-2 ms a request faster than httpx
        here); made lazily because it must be made inside the running event loop."""
        session = self._sessions.get(replica.name)
        if session is None:
            g = self.cfg.gateway
            headers = {"Content-Type": "application/json"}
            if replica.api_key:
                headers["Authorization"] = f"Bearer {replica.api_key}"
            session = self._sessions[replica.name] = aiohttp.ClientSession(
                base_url=replica.url, connector=aiohttp.TCPConnector(limit=256, keepalive_timeout=KEEP_ALIVE_S - 15),
                headers=headers, skip_auto_headers=("User-Agent", "Accept-Encoding"),
                timeout=aiohttp.ClientTimeout(total=g.request_timeout_s, sock_connect=5.0))
        return session

    # --- the engines ----------------------------------------------------------------------------

    def engine_ready(self) -> bool:
        return self.replicas.any_ready()

    async def _send(self, path: str, body: dict[str, Any],
                    exclude: tuple[Replica, ...] = ()) -> tuple[Replica, aiohttp.ClientResponse]:
        """POST to the least loaded ready replica (not one in `exclude`); one that refuses the
        connection (so it got nothing) leaves rotation and the next one is tried. The caller
        releases the response and the replica's `in_flight`."""
        tried = exclude
        model = body["model"]
        while (replica := self.replicas.pick(exclude=tried)) is not None:
            replica.in_flight += 1
            self.router.hold(model)
            try:
                return replica, await self.session(replica).post(path, data=orjson.dumps(body))
            except aiohttp.ClientConnectorError as e:
                self._failed(replica, model)
                replica.mark_down(f"refused a connection ({type(e).__name__})")
                tried += (replica,)
            except BaseException:
                self._failed(replica, model)
                raise
        raise self.unavailable("no engine replica is ready" if tried == exclude else "every replica refused the connection")

    def _failed(self, replica: Replica, model: str) -> None:
        replica.in_flight -= 1
        replica.failed += 1
        self.router.release(model)

    def _done(self, replica: Replica, r: aiohttp.ClientResponse, model: str) -> None:
        r.release()
        replica.in_flight -= 1
        replica.answered += 1
        self.router.release(model)

    def unavailable(self, why: str) -> HTTPProblem:
        print(f"alignloop gateway: 503 to a client: the engine is unavailable ({why})", file=sys.stderr, flush=True)
        return HTTPProblem(503, f"the model engine is unavailable ({why}); retry shortly", "service_unavailable",
                           code="engine_unavailable", headers={"Retry-After": str(self.cfg.gateway.retry_after_s)})

    async def engine_json(self, path: str, body: dict[str, Any], exclude: tuple[Replica, ...] = ()) -> dict[str, Any]:
        """POST to the engine (not to a replica in `exclude`) and return its JSON answer: for
        requests that are not live traffic (second answers, arena, evaluation, rollouts). A 4xx
        keeps its status, anything worse is a 503."""
        try:
            replica, r = await self._send(path, body, exclude)
        except TimeoutError:
            raise HTTPProblem(504, "the model engine did not answer in time", "timeout") from None
        except aiohttp.ClientError as e:
            raise self.unavailable(type(e).__name__) from None
        try:
            if r.status >= 500:
                raise HTTPProblem(503, f"the engine failed: {(await r.read())[:300]!r}")
            if r.status >= 400:
                raise engine_refusal(r.status, await r.read())
            return orjson.loads(await r.read())
        except TimeoutError:
            raise HTTPProblem(504, "the model engine did not answer in time", "timeout") from None
        except (aiohttp.ClientError, orjson.JSONDecodeError) as e:
            replica.failed += 1
            raise self.unavailable(type(e).__name__) from None
        finally:
            self._done(replica, r, body["model"])

    # --- the hot path -------------------------------------------------------------------------

    def route(self, model: str, max_tokens: int | None) -> tuple[int, str]:
        limit = self.cfg.engine.max_model_len
        if max_tokens is not None and max_tokens >= limit:
            raise HTTPProblem(400, f"max_tokens is {max_tokens}, but this model's context is {limit} tokens "
                                   "(prompt and completion together)", param="max_tokens")
        try:
            version, engine_model = self.router.resolve(model)
        except UnknownModel:
            what = (f"the version {model!r} does not exist or is not loaded (a version answers while it serves, "
                    "is the previous one or a canary)" if VERSION_NAME.fullmatch(model) else
                    f"the model {model!r} does not exist")
            raise HTTPProblem(404, f"{what}; available: {', '.join(self.router.names())}",
                              param="model", code="model_not_found") from None
        if not self.engine_ready():
            raise self.unavailable("starting or restarting")
        return version, engine_model

    async def complete(self, endpoint: str, path: str, req: ChatRequest | CompletionRequest, body: dict[str, Any],
                       user_id: int | None) -> Response:
        version, engine_model = self.route(req.model, req.max_tokens or req.max_completion_tokens)
        chat = isinstance(req, ChatRequest)
        # The gateway owns the ids: the engine gets a fresh request_id (replacing any the client sent),
        # and every id the client sees is rewritten to it, so a logged id can never be chosen or repeated.
        request_id = uuid.uuid4().hex
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        upstream = {**body, "model": engine_model, "request_id": request_id}
        upstream.pop("priority", None)  # live traffic keeps the default, highest priority
        messages = req.text_messages() if chat else [{"role": "user", "content": req.prompt}]
        # A prompt with tool definitions, calls or results is answered and counted but not logged:
        # every logged prompt becomes training and evaluation data in plain {role, text} turns (pairs,
        # PPO rollouts, held-out prompts, KTO feedback), and such a prompt is not one. No id: not logged.
        logged_id = "" if chat and req.uses_tools() else response_id
        if req.stream:
            upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        started = time.perf_counter()
        self.in_flight += 1
        try:
            replica, r = await self._send(path, upstream)
        except TimeoutError:
            self.in_flight -= 1
            raise HTTPProblem(504, "the model engine did not answer in time", "timeout") from None
        except aiohttp.ClientError as e:
            self.in_flight -= 1
            raise self.unavailable(type(e).__name__) from None
        except HTTPProblem:
            self.in_flight -= 1
            raise
        if r.status >= 400:
            self.in_flight -= 1
            text = await r.read()
            self._done(replica, r, engine_model)
            if r.status >= 500:
                raise self.unavailable(f"engine answered {r.status}: {text[:300]!r}")
            raise engine_refusal(r.status, text)
        record = Exchange(request_id=logged_id, endpoint=endpoint, model_requested=req.model, version_id=version,
                          messages=messages, choices=[], sampling=req.sampling(), user_id=user_id)
        if req.stream:
            def end(relay: Relay) -> None:
                replica.failed += relay.engine_failed
                self._done(replica, r, engine_model)
                self.in_flight -= 1
                self._finish(relay.record, relay.usage, started)

            wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return Relay(r, record, response_id, wants_usage, end)
        try:
            data = orjson.loads(await r.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as e:
            replica.failed += 1
            raise self.unavailable(f"broken answer: {type(e).__name__}") from None
        finally:
            self._done(replica, r, engine_model)
            self.in_flight -= 1
        data["id"], data["model"] = response_id, req.model
        record.choices = [(_choice_text(c), c.get("finish_reason")) for c in sorted(data["choices"], key=lambda c: c["index"])]
        self._finish(record, data.get("usage"), started)
        return Response(orjson.dumps(data), media_type="application/json")

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

    # --- feedback on a logged answer ------------------------------------------------------------

    def feedback(self, req: FeedbackRequest, user_id: int | None) -> int:
        """One caller's thumb or score on a logged answer (a later one replaces theirs): a KTO
        training example, so anonymous callers may give it only with `gateway.anonymous_feedback`."""
        if user_id is None and not self.cfg.gateway.anonymous_feedback:
            raise HTTPProblem(401, "feedback needs the API key of a known user ('Authorization: Bearer <key>'; an "
                                   "admin makes one with `alignloop user add NAME --role app`)", "authentication_error")
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

    # --- active learning ----------------------------------------------------------------------

    def rank_queue(self, margins: dict[int, float], reward_model_id: int | None) -> dict[str, Any]:
        """Rank the waiting pairs given a margin (reply a's reward minus b's, by the current reward
        model) by what a label would teach (loop/evaluation/active.py), and hand them out in that
        order. Pairs labelled meanwhile, or not waiting, are left out."""
        waiting = self.queue.waiting(self.cfg.labeling.rank_limit)
        candidates = [active.Candidate(p["pair_id"], p["prompt_key"], margins[p["pair_id"]], p["votes_a"], p["votes_b"])
                      for p in waiting if p["pair_id"] in margins]
        scored = active.rank(candidates, self.store.labelled_per_prompt())
        stored = self.queue.set_scores([vars(s) for s in scored], reward_model_id)
        return {"ranked": stored, "left_out": len(margins) - stored, "order": self.cfg.labeling.order}

    # --- what operators see -----------------------------------------------------------------------

    def errors(self) -> dict[str, int]:
        """Failures the gateway survives without a client seeing them, by where they happened."""
        return {"pair_maker": self.pairs.failed, "pair_queue_full": self.pairs.dropped,
                "log_dropped": self.writer.dropped, "adapter_unload": self.versions.unload_failures,
                "monitor": self.monitor.failures}

    def status(self) -> dict[str, Any]:
        r = self.router.routes
        return {"alias": r.alias, "serving": r.serving, "previous": r.previous, "canary": r.canary,
                "canary_share": r.canary_share, "models": self.router.names(),
                "engine": self.engine_summary(), "replicas": self.replicas.status(),
                "log_queue": self.writer.depth, "log_dropped": self.writer.dropped,
                "pair_queue": self.pairs.pending, "pairs_made": self.writer.pairs_made,
                "errors": self.errors(), "monitor": self.monitor.status(), "methods": list(METHODS),
                "counts": self.store.counts()}

    def engine_summary(self) -> dict[str, Any]:
        """The engines in one line (the first replica's url and pid; restarts of all)."""
        first = self.replicas.members[0] if self.replicas.members else None
        return {"ready": self.engine_ready(), "url": first.url if first else None, "pid": first.pid if first else None,
                "restarts": self.replicas.restarts,
                "replicas_ready": len(self.replicas.ready()), "replicas": len(self.replicas.members)}

    def render_metrics(self) -> bytes:
        m = self.metrics
        m.in_flight.set(self.in_flight)
        m.log_queue.set(self.writer.depth)
        m.log_dropped.set(self.writer.dropped)
        m.pair_queue.set(self.pairs.pending)
        m.pairs.set(self.writer.pairs_made)
        for where, count in self.errors().items():
            m.errors.labels(where).set(count)
        m.serving.set(self.router.routes.serving)
        m.engine_up.set(1 if self.engine_ready() else 0)
        m.engine_restarts.set(self.replicas.restarts)
        for replica in self.replicas.members:
            m.replica_up.labels(replica.name).set(1 if replica.ready.is_set() else 0)
            m.replica_in_flight.labels(replica.name).set(replica.in_flight)
            m.replica_restarts.labels(replica.name).set(replica.restarts)
            m.replica_adapters.labels(replica.name).set(len(replica.adapters))
        m.rollbacks.set(self.monitor.rollbacks)
        watch = self.monitor.watch
        m.watching.set(watch.version if watch is not None and watch.outcome == "watching" else -1)
        canary = self.monitor.canary
        m.watching_canary.set(canary.version if canary is not None and canary.outcome == "watching" else -1)
        return m.render()

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self.writer.stop()


def _choice_text(choice: dict) -> str:
    if "message" in choice:
        return choice["message"].get("content") or ""
    return choice.get("text") or ""
