"""The gateway as real clients use it: the official `openai` SDK (sync, async, streaming) and
LiteLLM's SDK, against one real `alignloop serve` (vLLM CPU engine).

The model is the tiny demo model with a tool-aware chat template (the demo's own template refuses
tool messages, and vLLM answers such a request 400), so a tool-call history can be answered.
The first tests need no server: the request models on their own.

Seeded requests are sent one at a time: concurrent seeded requests can crash vLLM's CPU engine
(issue 13, fixed separately by an engine setting).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import time

import openai
import pytest

from loop.serving.protocol import ChatRequest, HTTPProblem, parse
from tests.serving import free_port, start

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost map from the network

HELLO = [{"role": "user", "content": "How often should I water basil?"}]
PARTS = [{"role": "user", "content": [{"type": "text", "text": "How often"},
                                      {"type": "text", "text": "should I water basil?"}]}]
HISTORY = [
    {"role": "system", "content": "You are a gardener. Answer briefly."},
    {"role": "user", "content": "Which herbs grow well indoors?"},
    {"role": "assistant", "content": "Basil, mint and parsley."},
    {"role": "user", "content": [{"type": "text", "text": "And how much light do they need?"}]},
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_HISTORY = [
    {"role": "system", "content": "You are a gardener."},
    {"role": "user", "content": "Should I water the basil outside today?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Paris: heavy rain all day, 14 C."},
]
IMAGE = [{"role": "user", "content": [
    {"type": "text", "text": "What plant is this?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
ID = re.compile(r"^(chatcmpl|cmpl)-[0-9a-f]{32}$")

# What a Hugging Face chat model's template does with tools, in the demo tokenizer's special tokens.
TOOL_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<|user|>[result of ' + message['tool_call_id'] + '] ' + message['content'] + '<|end|>' -}}"
    "{%- else -%}"
    "{{- '<|' + message['role'] + '|>' + (message['content'] or '') -}}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set args = call['function']['arguments'] -%}"
    "{{- '[call ' + call['function']['name'] + ' ' + (args if args is string else args | tojson) + ']' -}}"
    "{%- endfor -%}"
    "{{- '<|end|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


# --- the request models, no server -------------------------------------------------------------

def chat(messages, **fields):
    return parse(ChatRequest, {"model": "alignloop", "messages": messages, **fields})


def refused(messages, **fields) -> HTTPProblem:
    with pytest.raises(HTTPProblem) as e:
        chat(messages, **fields)
    assert e.value.status == 400 and e.value.type == "invalid_request_error"
    return e.value


def test_content_parts_are_text_and_logged_as_text():
    req = chat(HISTORY)
    assert req.text_messages()[-1] == {"role": "user", "content": "And how much light do they need?"}
    assert chat(PARTS).text_messages() == [{"role": "user", "content": "How often\nshould I water basil?"}]
    assert not req.uses_tools()


def test_tool_histories_parse_and_are_marked():
    req = chat(TOOL_HISTORY)
    assert req.uses_tools() and req.messages[2].tool_calls[0].function.name == "get_weather"
    assert req.text_messages()[2:] == [{"role": "assistant", "content": ""},
                                       {"role": "tool", "content": "Paris: heavy rain all day, 14 C."}]
    assert chat(HELLO, tools=TOOLS).uses_tools()


def test_images_and_malformed_messages_are_refused_clearly():
    e = refused(IMAGE)
    assert e.param == "messages.0.content" and "'image_url'" in e.message and "text only" in e.message
    assert "content must be" in refused([{"role": "user", "content": 7}]).message
    assert "not a content part" in refused([{"role": "user", "content": ["hi"]}]).message
    assert "content is required" in refused([{"role": "user", "content": None}]).message
    assert "content is required" in refused([{"role": "assistant"}]).message
    assert "tool_call_id" in refused([{"role": "tool", "content": "42"}]).message
    assert "only an assistant" in refused([{"role": "user", "content": "x", "tool_calls": [CALL]}]).message
    assert refused(HELLO, stream_options="yes").param == "stream_options"


# --- one real server, two real clients ----------------------------------------------------------

@pytest.fixture(scope="module")
def tool_model(tiny_model, tmp_path_factory):
    model = tmp_path_factory.mktemp("tool-model") / "model"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").write_text(TOOL_TEMPLATE)
    return model


@pytest.fixture(scope="module")
def server(tool_model, tmp_path_factory):
    s = start(tmp_path_factory.mktemp("clients"), tool_model, free_port(), free_port(),
              ["gateway.pair_share=0.0", "gateway.log_flush_ms=100"])
    yield s
    s.stop(signal.SIGKILL) if s.proc.poll() is None else None


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.admin_token, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def lite(server):
    import litellm

    litellm.suppress_debug_info = True
    litellm.telemetry = False
    return litellm, {"api_base": f"{server.url}/v1", "api_key": server.admin_token, "max_retries": 0,
                     "timeout": 120}


def logged(server, ids, timeout=15.0) -> dict[str, dict]:
    """The logged exchanges with these response ids (streams are logged just after their last event)."""
    deadline = time.monotonic() + timeout
    while True:
        with server.client() as c:
            found = {e["request_id"]: e for e in c.get("/api/exchanges", params={"limit": 10_000}).json()
                     if e["request_id"] in ids}
        if len(found) == len(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def messages_of(exchange: dict) -> list[dict]:
    return json.loads(exchange["messages"]) if isinstance(exchange["messages"], str) else exchange["messages"]


def prompt_tokens(oai, messages) -> int:
    return oai.chat.completions.create(model="alignloop", messages=messages, max_tokens=1).usage.prompt_tokens


def stop_case(text: str) -> tuple[str, str] | None:
    """A one-letter stop string in `text` after its start, and the text that comes before it."""
    for ch in text[1:]:
        if ch.isascii() and ch.isalpha():
            return ch, text[:text.index(ch)]
    return None


@pytest.mark.slow
def test_openai_content_forms_and_history(server, oai):
    plain = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=8)
    parts = oai.chat.completions.create(model="alignloop", messages=PARTS, max_tokens=8)
    multi = oai.chat.completions.create(model="alignloop", messages=HISTORY, max_tokens=8)
    for r in (plain, parts, multi):
        assert ID.match(r.id) and r.model == "alignloop" and r.choices[0].message.role == "assistant"
        assert r.usage.completion_tokens > 0
    # the engine saw the whole history: every turn adds prompt tokens
    assert multi.usage.prompt_tokens > prompt_tokens(oai, HISTORY[1:]) > prompt_tokens(oai, HISTORY[3:])
    log = logged(server, {plain.id, parts.id, multi.id})
    assert messages_of(log[parts.id]) == [{"role": "user", "content": "How often\nshould I water basil?"}]
    assert messages_of(log[multi.id])[0] == HISTORY[0] and len(messages_of(log[multi.id])) == 4
    assert log[plain.id]["texts"] == [plain.choices[0].message.content]


@pytest.mark.slow
def test_openai_tool_call_history(server, oai):
    # tool_choice "none": the engine runs without a tool-call parser, so "auto" would be its own 400
    r = oai.chat.completions.create(model="alignloop", messages=TOOL_HISTORY, tools=TOOLS, tool_choice="none",
                                    max_tokens=8)
    assert ID.match(r.id) and r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
    # the call and its result reached the template: they are in the prompt the engine counted
    assert r.usage.prompt_tokens > prompt_tokens(oai, TOOL_HISTORY[:2]) + 10
    # a tool result sent as text parts is the same prompt
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} if m["role"] == "tool" else m
             for m in TOOL_HISTORY]
    assert oai.chat.completions.create(model="alignloop", messages=parts, max_tokens=1).usage.prompt_tokens == \
        prompt_tokens(oai, TOOL_HISTORY)
    # answered and counted, but not logged as training data (see Gateway.complete)
    plain = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=2)
    assert plain.id in logged(server, {plain.id}) and not logged(server, {r.id}, timeout=0)


@pytest.mark.slow
def test_openai_stop_seed_logprobs_and_vllm_options(oai):
    ask = dict(model="alignloop", messages=HELLO, max_tokens=16, temperature=1.0, seed=1234)
    first = oai.chat.completions.create(**ask, logprobs=True, top_logprobs=2)
    again = oai.chat.completions.create(**ask)
    assert first.choices[0].message.content == again.choices[0].message.content  # the seed is honoured
    tokens = first.choices[0].logprobs.content
    assert len(tokens) == first.usage.completion_tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    case = stop_case(first.choices[0].message.content)
    assert case, f"no letter to stop on in {first.choices[0].message.content!r}"
    stopped = oai.chat.completions.create(**ask, stop=[case[0]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == case[1]
    # vLLM's own sampling options pass through the gateway untouched
    long = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=12,
                                       extra_body={"ignore_eos": True, "top_k": 5, "min_p": 0.01,
                                                   "repetition_penalty": 1.1})
    assert long.usage.completion_tokens == 12 and long.choices[0].finish_reason == "length"
    short = oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=12,
                                        extra_body={"min_tokens": 12})
    assert short.usage.completion_tokens == 12


@pytest.mark.slow
def test_openai_streaming_usage_and_n2(server, oai):
    chunks = list(oai.chat.completions.create(model="alignloop", messages=PARTS, max_tokens=10, stream=True,
                                              stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and ID.match(chunks[0].id) and {c.model for c in chunks} == {"alignloop"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)

    plain = list(oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=6, stream=True))
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)  # usage only when asked

    two = list(oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=8, n=2, stream=True,
                                           temperature=1.0, stream_options={"include_usage": True}))
    texts, finish = {0: "", 1: ""}, {}
    for ch in two:
        for c in ch.choices:
            texts[c.index] += c.delta.content or ""
            finish[c.index] = c.finish_reason or finish.get(c.index)
    assert set(finish) == {0, 1} and all(finish.values()) and two[-1].usage.completion_tokens > 0

    log = logged(server, {chunks[0].id, two[0].id})
    assert log[chunks[0].id]["texts"] == [text]
    assert log[chunks[0].id]["completion_tokens"] == chunks[-1].usage.completion_tokens
    assert log[two[0].id]["texts"] == [texts[0], texts[1]]


@pytest.mark.slow
def test_openai_legacy_completions(server, oai):
    text = oai.completions.create(model="alignloop", prompt="Basil likes", max_tokens=8)
    assert re.match(r"^cmpl-[0-9a-f]{32}$", text.id) and text.model == "alignloop" and text.choices[0].text is not None
    chunks = list(oai.completions.create(model="base", prompt="Basil likes", max_tokens=6, stream=True,
                                         stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[-1].usage.completion_tokens > 0
    streamed = "".join(c.text for ch in chunks for c in ch.choices)
    log = logged(server, {text.id, chunks[0].id})
    assert log[text.id]["endpoint"] == "completions" and log[text.id]["texts"] == [text.choices[0].text]
    assert log[chunks[0].id]["texts"] == [streamed] and log[chunks[0].id]["model_requested"] == "base"


@pytest.mark.slow
def test_openai_models_list_and_retrieve(oai):
    names = [m.id for m in oai.models.list()]
    assert names[0] == "alignloop" and "base" in names
    for name in names:
        m = oai.models.retrieve(name)
        assert (m.id, m.object, m.owned_by) == (name, "model", "alignloop") and m.created > 0
    with pytest.raises(openai.NotFoundError) as e:
        oai.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found" and e.value.param == "model"


@pytest.mark.slow
def test_openai_errors_are_openai_shaped(oai):
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=4)
    assert e.value.status_code == 404 and e.value.code == "model_not_found" and e.value.type == "invalid_request_error"
    assert "alignloop" in e.value.message  # it names the models there are
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="alignloop", messages=IMAGE, max_tokens=4)
    assert e.value.param == "messages.0.content" and "text only" in e.value.message
    for bad in ({"messages": [{"role": "user", "content": 3}]}, {"messages": HELLO, "temperature": 5},
                {"messages": HELLO, "max_tokens": 10**6}, {"messages": HELLO, "n": 99}):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="alignloop", **{"max_tokens": 4, **bad})
        assert e.value.type == "invalid_request_error" and e.value.message
    with pytest.raises(openai.BadRequestError):  # the engine's own 4xx comes back with its message
        oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4, extra_body={"top_k": "many"})
    with pytest.raises(openai.BadRequestError) as e:  # in the gateway's schema: vLLM's numeric code is not kept
        oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4,
                                    stream_options={"include_usage": True})
    assert "stream" in e.value.message and e.value.param == "stream_options" and e.value.code is None
    with pytest.raises(openai.BadRequestError) as e:  # no tool-call parser in the engine: a clear 400
        oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=4, tools=TOOLS)
    assert "does not call tools" in e.value.message and e.value.param == "tools" and "--" not in e.value.message


@pytest.mark.slow
def test_gateway_owns_response_ids(server, oai):
    """A client's request_id (body or X-Request-Id) is replaced: the same one twice logs two exchanges."""
    ids = [oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=2,
                                       extra_body={"request_id": "mine"}, extra_headers={"X-Request-Id": "mine"}).id
           for _ in range(2)]
    streamed = list(oai.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=2, stream=True,
                                                extra_body={"request_id": "mine"}))[0].id
    ids.append(streamed)
    assert len(set(ids)) == 3 and all(ID.match(i) and "mine" not in i for i in ids)
    assert set(logged(server, set(ids))) == set(ids)


@pytest.mark.slow
def test_openai_async_concurrent(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=server.admin_token, max_retries=0,
                                    timeout=180)

        async def streamed(i):
            stream = await client.chat.completions.create(model="alignloop", messages=HELLO, max_tokens=6,
                                                          stream=True, stream_options={"include_usage": True})
            chunks = [c async for c in stream]
            return chunks[0].id, chunks[-1].usage.completion_tokens

        async def whole(i):
            messages = PARTS if i % 2 else HISTORY
            r = await client.chat.completions.create(model="alignloop", messages=messages, max_tokens=6)
            return r.id, r.usage.completion_tokens

        try:
            return await asyncio.gather(*(streamed(i) if i % 4 == 0 else whole(i) for i in range(16)))
        finally:
            await client.close()

    results = asyncio.run(run())
    ids = {rid for rid, _ in results}
    assert len(ids) == 16 and all(n > 0 for _, n in results)
    assert set(logged(server, ids)) == ids


# --- LiteLLM's SDK: the same gateway through another real client ----------------------------------

@pytest.mark.slow
def test_litellm_chat_history_tools_and_sampling(server, lite):
    litellm, kw = lite
    model = "openai/alignloop"
    for messages in (HELLO, PARTS, HISTORY, TOOL_HISTORY):
        r = litellm.completion(model=model, messages=messages, max_tokens=6, **kw)
        assert ID.match(r.id) and r.choices[0].message.role == "assistant" and r.usage.completion_tokens > 0
    ask = dict(model=model, messages=HELLO, max_tokens=16, temperature=1.0, seed=99, **kw)
    first = litellm.completion(**ask, logprobs=True, top_logprobs=2)
    assert litellm.completion(**ask).choices[0].message.content == first.choices[0].message.content
    assert len(first.choices[0].logprobs.content) == first.usage.completion_tokens
    case = stop_case(first.choices[0].message.content)
    assert case, f"no letter to stop on in {first.choices[0].message.content!r}"
    stopped = litellm.completion(**ask, stop=[case[0]])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].message.content == case[1]
    long = litellm.completion(model=model, messages=HELLO, max_tokens=10, extra_body={"ignore_eos": True}, **kw)
    assert long.usage.completion_tokens == 10


@pytest.mark.slow
def test_litellm_streaming(server, lite):
    litellm, kw = lite
    chunks = list(litellm.completion(model="openai/alignloop", messages=HELLO, max_tokens=8, n=2, stream=True,
                                     temperature=1.0, stream_options={"include_usage": True}, **kw))
    assert len({c.id for c in chunks}) == 1 and ID.match(chunks[0].id)
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert set(texts) == {0, 1}
    usage = [c.usage for c in chunks if getattr(c, "usage", None)]
    assert usage and usage[-1].completion_tokens > 0
    log = logged(server, {chunks[0].id})
    assert log[chunks[0].id]["texts"] == [texts[0], texts[1]]


@pytest.mark.slow
def test_litellm_completions_models_and_errors(server, lite):
    litellm, kw = lite
    text = litellm.text_completion(model="openai/alignloop", prompt="Basil likes", max_tokens=6, **kw)
    assert re.match(r"^cmpl-[0-9a-f]{32}$", text.id) and text.choices[0].text is not None
    models = litellm.get_valid_models(check_provider_endpoint=True, custom_llm_provider="openai",
                                      api_base=kw["api_base"], api_key=kw["api_key"])
    assert {"alignloop", "base"} <= {m.removeprefix("openai/") for m in models}
    with pytest.raises(litellm.NotFoundError) as e:
        litellm.completion(model="openai/gpt-4o", messages=HELLO, max_tokens=4, **kw)
    assert e.value.status_code == 404 and "does not exist" in e.value.message
    with pytest.raises(litellm.BadRequestError) as e:
        litellm.completion(model="openai/alignloop", messages=IMAGE, max_tokens=4, **kw)
    assert e.value.status_code == 400 and "text only" in e.value.message
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(model="openai/alignloop", messages=HELLO, max_tokens=4, temperature=5, **kw)
    assert text.id in logged(server, {text.id})


@pytest.mark.slow
def test_litellm_async_concurrent(server, lite):
    litellm, kw = lite

    async def one(i):
        if i % 4:
            r = await litellm.acompletion(model="openai/alignloop", messages=PARTS, max_tokens=6, **kw)
            return r.id
        stream = await litellm.acompletion(model="openai/alignloop", messages=HELLO, max_tokens=6, stream=True, **kw)
        chunks = [c async for c in stream]  # the whole stream: its exchange is logged at its end
        return chunks[0].id

    async def run():
        return await asyncio.gather(*(one(i) for i in range(16)))

    ids = set(asyncio.run(run()))
    assert len(ids) == 16 and all(ID.match(i) for i in ids)
    assert set(logged(server, ids)) == ids
