"""Schemathesis fuzzes the gateway against its own OpenAPI schema, over HTTP, on a real
`alignloop serve` (gateway + vLLM CPU engine, tiny model): every operation, a bounded number of
examples each (schema-valid and schema-violating ones, boundary values, unexpected methods), as
each audience: no token, an application's API key (`app`), a labeller, an admin.

What must hold for every answer:
- no 5xx (`not_a_server_error`);
- the answer is one the schema describes: its status code, content type, headers and body
  (`status_code_conformance`, `content_type_conformance`, `response_headers_conformance`,
  `response_schema_conformance`);
- a request outside the schema is refused with a 4xx (`negative_data_rejection`);
- an audience gets nothing it may not have (`audience`, below): on all of `/api` without a token,
  on all of `/api` with an app's key, and on the admin API with a labeller's token, every answer is
  a refusal: 401 or 403, or a 400/413/415 for a body that is not JSON at all (refused before any
  route runs, so before the token is looked at).

A 413 counts as a refusal for `negative_data_rejection` (schemathesis's list lacks it). Left out on
purpose: `positive_data_acceptance` (a schema-valid request may still be refused for
the state it meets, e.g. a rollback with nothing to roll back to) and `allow_header_conformance`
(Starlette's 405 on a path with one route per method names only that route's method).

`POST /api/retrain` is not fuzzed: each call spawns a real training process. Every other admin
operation is, state changes included (promote, rollback, canary, users, runs, snapshots): the
server is this module's own and is thrown away after it. The admin's turn comes last. The fuzz
users' names are ones the fuzzer does not generate, so it cannot rotate their tokens.

`/v1/chat/completions`, `/v1/completions` and `/v1/feedback` read their raw body; the app's
schema describes it with the model each parses it with (`loop.serving.app.RAW_BODIES`), which
`test_every_operation_describes_its_request_body` checks, so the fuzzer reaches their validation
and the engine.

Schemathesis runs as its own command (`st run`, the documented interface; its pytest plugin does
not run under pytest 9.2), with this module as its hooks file (`SCHEMATHESIS_HOOKS`). A failure
prints schemathesis's report: each finding with a curl command that reproduces it.
`ALIGNLOOP_FUZZ_EXAMPLES` (default 20 an operation, three times that for the two that generate) and
`ALIGNLOOP_FUZZ_SEED` (default fixed, so a run is the same every time) change the run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROLE_ENV = "ALIGNLOOP_FUZZ_ROLE"

if os.environ.get(ROLE_ENV):  # loaded by schemathesis, in its own process, as its hooks file
    import schemathesis
    from hypothesis import strategies as st

    from loop.serving.routes import admin as _admin_routes

    _ROLE = os.environ[ROLE_ENV]
    _ADMIN_OPS = {(method, route.path) for route in _admin_routes.router.routes for method in route.methods}

    _REFUSALS = {400, 401, 403, 405, 413, 415}

    @schemathesis.check
    def audience(ctx, response, case) -> None:
        """A role outside an operation's audience gets nothing but a refusal."""
        op = (case.operation.method.upper(), case.operation.path)
        outside = op[1].startswith("/api/") and (_ROLE in ("anonymous", "app") or
                                                 (_ROLE == "labeller" and op in _ADMIN_OPS))
        if outside:
            assert response.status_code in _REFUSALS, (
                f"{case.method} {case.path} answered {response.status_code} to a caller with "
                f"{'no token' if _ROLE == 'anonymous' else f'a {_ROLE} token'}")

    from pydantic import TypeAdapter, ValidationError

    from loop.serving.protocol import Message

    _HELLO = [{"role": "user", "content": "How often should I water basil?"}]
    _CHAT = TypeAdapter(list[Message])  # the model the schema's messages are made from

    def _chat_valid(messages) -> bool:
        """Whether a generated chat is a valid one: only such a chat may be swapped for another valid
        one. Swapping a chat generated to be refused (a role outside the enum; then a tool_call_id
        that is a number) made the case valid, and schemathesis reported the gateway for accepting it."""
        if not (isinstance(messages, list) and messages):
            return False
        try:
            _CHAT.validate_python(messages)
        except ValidationError:
            return False
        return True

    @schemathesis.hook
    def flatmap_body(context, body):
        """Generated model names are unknown (a quick 404) and generated chats rarely valid (a
        quick 400): make some served names and valid chats, so that generated sampling options
        reach the engine. (Schemathesis checks again whether a changed case is still invalid.)"""
        if not (context.operation.path.startswith("/v1/") and isinstance(body, dict)):
            return st.just(body)
        models = [body["model"], "alignloop", "base"] if isinstance(body.get("model"), str) else [body.get("model")]
        chats = [body.get("messages"), _HELLO, _HELLO] if _chat_valid(body.get("messages")) else [body.get("messages")]
        return st.tuples(st.sampled_from(models), st.sampled_from(chats)).map(
            lambda mc: {**body, **({"model": mc[0]} if "model" in body else {}),
                        **({"messages": mc[1]} if "messages" in body else {})})

else:
    from tests.serving import free_port, start

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
MAX_EXAMPLES = int(os.environ.get("ALIGNLOOP_FUZZ_EXAMPLES", "20"))
SEED = int(os.environ.get("ALIGNLOOP_FUZZ_SEED", "20260613"))
ROLES = ("anonymous", "app", "labeller", "admin")  # the admin last: its calls change the server's state
NOT_FUZZED = ("/api/retrain", "/api/shutdown")  # spawn processes or stop the server
CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance", "negative_data_rejection", "audience")
V1_BODIES = ("/v1/chat/completions", "/v1/completions", "/v1/feedback")


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    # no rate limit: a 429 would depend on the machine's speed (the limiter has its own tests)
    s = start(root, tiny_model, free_port(), free_port(), ["gateway.log_flush_ms=100", "gateway.rate_limit_per_s=0"])
    yield s
    s.stop(signal.SIGKILL) if s.proc.poll() is None else None


@pytest.fixture(scope="module")
def tokens(server) -> dict[str, str | None]:
    out: dict[str, str | None] = {"anonymous": None}
    with server.client() as admin:
        for role in ROLES[1:]:
            r = admin.post("/api/users", json={"name": f"fuzz-{role}-{secrets.token_hex(4)}", "role": role})
            r.raise_for_status()
            out[role] = r.json()["token"]
    return out


@pytest.fixture(scope="module")
def own_schema(server) -> dict[str, Any]:
    """The gateway's schema: at /api/openapi.json for admins (or public at /openapi.json)."""
    with server.client() as admin:
        r = admin.get("/api/openapi.json")
        if r.status_code == 404:
            r = admin.get("/openapi.json")
        r.raise_for_status()
        return r.json()


@pytest.mark.parametrize("role", ROLES)
def test_the_gateway_keeps_to_its_schema_for_every_audience(role, server, tokens, own_schema, tmp_path):
    schema_file = tmp_path / "openapi.json"
    schema_file.write_text(json.dumps(own_schema))
    config = tmp_path / "schemathesis.toml"
    config.write_text(
        # no .schemathesis/ cache in the repository, and no crashes of an earlier run replayed first
        '[cache]\nenabled = false\n'
        # a body over gateway.max_body_kb is refused with 413, as it should be
        '[checks.negative_data_rejection]\nexpected-statuses = '
        '["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429", "5xx"]\n'
        # the two routes to the engine get three times the examples
        f'[[operations]]\ninclude-path-regex = "^/v1/(chat/)?completions$"\n'
        f'generation.max-examples = {3 * MAX_EXAMPLES}\n')
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run", str(schema_file),
               "--url", server.url,
               "--checks", ",".join(CHECKS), "--phases", "examples,coverage,fuzzing", "--mode", "all",
               "--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--continue-on-failure", "--request-timeout", "120", "--generation-database", "none",
               "--output-sanitize", "false", "--no-color", "--suppress-health-check", "all"]
    for path in set(NOT_FUZZED) & set(own_schema["paths"]):
        command += ["--exclude-path", path]
    if tokens[role]:
        command += ["--header", f"Authorization: Bearer {tokens[role]}"]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, ROLE_ENV: role, "SCHEMATHESIS_HOOKS": "tests.test_fuzz", "PYTHONPATH": path}
    out = subprocess.run(command, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    print(out.stdout + out.stderr)  # the whole report, shown with a failure
    if out.returncode != 0:
        summary = out.stdout[out.stdout.rfind("SUMMARY"):] if "SUMMARY" in out.stdout else out.stdout[-3000:]
        pytest.fail(f"schemathesis found problems as {role} (its whole report is in the captured stdout):\n"
                    f"{summary}{out.stderr[-2000:]}", pytrace=False)
    generated = re.search(r"(\d+) generated", out.stdout)
    assert generated and int(generated.group(1)) >= 200, "the fuzzer should have sent hundreds of requests"


def test_the_gateway_is_healthy_after_the_fuzzing(server, tokens):
    """Runs after every role's fuzzing (tests run in file order): it still answers, and the engine
    never restarted (no input reached it in a form that crashes it). (The fuzz admin's token: the
    fuzzer may have rotated the local admin's.)"""
    with server.client(tokens["admin"]) as admin:
        assert admin.get("/healthz").status_code == 200
        chat = admin.post("/v1/chat/completions", json={"model": "alignloop", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "hello"}]})
        assert chat.status_code == 200
        assert admin.get("/api/status").json()["engine"]["restarts"] == 0


def test_every_operation_describes_its_request_body(own_schema):
    """The fuzzer reaches only what the schema describes."""
    missing = [f"POST {path}" for path in V1_BODIES if "requestBody" not in own_schema["paths"][path]["post"]]
    assert missing == []
