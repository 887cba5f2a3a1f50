"""The OpenAI-compatible door, driven by the real `openai` client (in a worker thread) against a
real server (random:tiny-qwen3 on 127.0.0.1 port 0) running in the test's nursery.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import trio

from streamer.types import SamplingParams, TokenEvent

TIMEOUT = 60


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


async def in_thread(fn):
    return await trio.to_thread.run_sync(fn)


async def engine_text(engine, ids: list[int], params: SamplingParams) -> str:
    """The same request straight through the engine, for comparison."""
    text = []
    async with engine.submit(ids, params) as gen:
        async for ev in gen:
            if isinstance(ev, TokenEvent):
                text.append(ev.text)
    return "".join(text)


async def test_chat_completions_stream_and_not(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    with trio.fail_after(TIMEOUT):
        models = await in_thread(lambda: oai.models.list())
        whole = await in_thread(lambda: oai.chat.completions.create(
            model=model, messages=messages, max_tokens=12, temperature=0, seed=3))

        def stream():
            chunks = oai.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
            return list(chunks)

        chunks = await in_thread(stream)
        expected = await engine_text(engine, engine.encode_chat(messages), SamplingParams(max_tokens=12))
    assert [m.id for m in models.data] == [model]
    assert whole.object == "chat.completion" and whole.model == model
    choice = whole.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("length", "stop")
    assert whole.usage.prompt_tokens == len(engine.encode_chat(messages))
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


async def test_completions_stream_and_not_with_stop(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    prompt = "Once upon a time"
    with trio.fail_after(TIMEOUT):
        full = await engine_text(engine, engine.encode_prompt(prompt), SamplingParams(max_tokens=16, ignore_eos=True))
        stop = full[len(full) // 2:][:3]  # a string that occurs in the greedy answer
        assert stop.strip(), full
        whole = await in_thread(lambda: oai.completions.create(model=model, prompt=prompt, max_tokens=16,
                                                               temperature=0, stop=[stop]))
        parts = await in_thread(lambda: list(oai.completions.create(
            model=model, prompt=prompt, max_tokens=16, temperature=0, stop=stop, stream=True)))
        by_ids = await in_thread(lambda: oai.completions.create(
            model=model, prompt=engine.encode_prompt(prompt), max_tokens=4, temperature=0))
    assert whole.object == "text_completion"
    assert whole.choices[0].text == full[:full.index(stop)] and whole.choices[0].finish_reason == "stop"
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert parts[-1].choices[0].finish_reason == "stop"
    assert by_ids.usage.completion_tokens == 4 and by_ids.choices[0].finish_reason == "length"


async def test_errors_have_openai_shape_and_status(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    long_prompt = "hello " * (engine.max_context + 10)
    cases = [
        (dict(model="gpt-4"), openai.NotFoundError, "model_not_found"),
        (dict(model=model, temperature=-1), openai.BadRequestError, "invalid_request"),
        (dict(model=model, n=17), openai.BadRequestError, "invalid_request"),
        (dict(model=model, max_tokens=0), openai.BadRequestError, "invalid_request"),
    ]
    with trio.fail_after(TIMEOUT):
        for kwargs, error, code in cases:
            with pytest.raises(error) as caught:
                await in_thread(lambda kw=kwargs: oai.chat.completions.create(
                    messages=[{"role": "user", "content": "hi"}], **kw))
            assert caught.value.body["code"] == code and caught.value.body["type"] == "invalid_request_error"
        with pytest.raises(openai.BadRequestError) as caught:
            await in_thread(lambda: oai.completions.create(model=model, prompt=long_prompt, max_tokens=4))
        assert caught.value.body["code"] == "prompt_too_long"
        async with httpx.AsyncClient(base_url=url) as http:
            bad_json = await http.post("/v1/completions", content=b"{nope")
            unknown = await http.post("/v1/completions", json={"model": model, "prompt": "x", "max_token": 3})
            no_model = await http.post("/v1/completions", json={"prompt": "x"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    assert no_model.status_code == 400 and no_model.json()["error"]["param"] == "model"
    assert no_model.json()["error"]["message"] == f"'model' is required; this server serves {model!r}"
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "max_token"
    text = (await trio.to_thread.run_sync(lambda: httpx.get(url + "/metrics"))).text
    assert 'streamer_errors_total{code="invalid_request"} 5.0' in text
    assert 'streamer_errors_total{code="invalid_json"} 1.0' in text
    assert 'streamer_errors_total{code="model_not_found"} 1.0' in text


async def test_client_leaving_a_stream_frees_kv(tiny_server):
    engine, url = tiny_server
    # Seeded: unseeded draws at OpenAI's default temperature 1 made the random model end with EOS
    # within 3 tokens now and then (about 1 run in 10); this seed's answer runs long.
    body = {"model": engine.model_name, "prompt": "tell me everything", "max_tokens": 100_000, "stream": True,
            "seed": 1}
    with trio.fail_after(TIMEOUT):
        async with httpx.AsyncClient(base_url=url) as http:
            async with http.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = response.aiter_lines()
                seen = 0
                while seen < 3:
                    seen += (await lines.__anext__()).startswith("data: {")
                assert engine.kv_statistics().used_blocks > 0
        while engine.kv_statistics().used_blocks:  # the request is aborted and its blocks freed
            await trio.sleep(0.01)
    assert engine.statistics().running == 0


async def test_ignore_eos_runs_to_max_tokens(tiny_server):
    """`ignore_eos`, as vLLM takes it (benchmarks need every answer full length); a non-boolean is a 400."""
    engine, url = tiny_server
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
        with trio.fail_after(TIMEOUT):
            r = await http.post("/v1/completions", json={"model": engine.model_name, "prompt": "a", "max_tokens": 40,
                                                         "temperature": 0, "ignore_eos": True})
            bad = await http.post("/v1/completions", json={"model": engine.model_name, "prompt": "a",
                                                           "ignore_eos": "yes"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_request"


async def test_logprobs_on_both_shapes_are_the_engines(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    messages = [{"role": "user", "content": "Tell me about the sea and the sky."}]
    with trio.fail_after(TIMEOUT):
        whole = await in_thread(lambda: oai.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3))
        chunks = await in_thread(lambda: list(oai.chat.completions.create(
            model=model, messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3, stream=True)))
        legacy = await in_thread(lambda: oai.completions.create(model=model, prompt="Once upon", max_tokens=6,
                                                               temperature=0, logprobs=2))
        plain = await in_thread(lambda: oai.chat.completions.create(model=model, messages=messages, max_tokens=4))
        expected = []
        async with engine.submit(engine.encode_chat(messages), SamplingParams(max_tokens=8, logprobs=3)) as gen:
            async for ev in gen:
                if isinstance(ev, TokenEvent):
                    expected.append(ev)
    text = engine.tokenizer.decode
    content = whole.choices[0].logprobs.content
    assert [c.token for c in content] == [text([ev.token_id]) for ev in expected]
    assert [c.logprob for c in content] == pytest.approx([ev.logprobs.logprob for ev in expected], abs=1e-6)
    assert [[t.token for t in c.top_logprobs] for c in content] == [
        [text([i]) for i, _ in ev.logprobs.top] for ev in expected]
    assert all(c.bytes == list(c.token.encode()) for c in content)
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == legacy.usage.completion_tokens
    assert all(len(top) <= 2 and max(top.values()) >= v - 1e-6 for top, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert plain.choices[0].logprobs is None


async def test_n_samples_share_the_prompt_and_draw_their_own_streams(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    prompt = "The quick brown fox jumps over the lazy dog. " * 3  # several full KV blocks
    kwargs = dict(model=model, prompt=prompt, max_tokens=8, temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    with trio.fail_after(TIMEOUT):
        hits = engine.statistics().prefix_hit_tokens
        three = await in_thread(lambda: oai.completions.create(n=3, **kwargs))
        shared = engine.statistics().prefix_hit_tokens - hits
        one = await in_thread(lambda: oai.completions.create(**kwargs))
        chunks = await in_thread(lambda: list(oai.completions.create(n=3, stream=True, **kwargs)))
        assert engine.statistics().kv.used_blocks == 0
    texts = [c.text for c in sorted(three.choices, key=lambda c: c.index)]
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert texts[0] == one.choices[0].text  # sample 0 draws with the request's seed
    assert len(set(texts)) == 3
    assert three.usage.completion_tokens == 3 * 8
    cached = (len(engine.encode_prompt(prompt)) - 1) // engine.block_size * engine.block_size
    assert cached >= 2 * engine.block_size
    assert shared == 2 * cached  # samples 1 and 2 found the prompt sample 0 computed
    streamed = ["", "", ""]
    for ch in chunks:
        for c in ch.choices:
            streamed[c.index] += c.text
    assert streamed == texts


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                                           "required": ["city"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


async def test_response_format_json_schema_and_json_object(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "why": {"type": "string", "maxLength": 10}},
              "required": ["answer", "why"], "additionalProperties": False}
    messages = [{"role": "user", "content": "What is 6 x 7? Answer in JSON."}]
    with trio.fail_after(TIMEOUT):
        strict = await in_thread(lambda: oai.chat.completions.create(
            model=model, messages=messages, max_tokens=200, temperature=0.7, seed=2,
            response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}))
        loose = await in_thread(lambda: list(oai.chat.completions.create(
            model=model, messages=messages, max_tokens=200, temperature=0.7, seed=2, stream=True,
            response_format={"type": "json_object"})))
        with pytest.raises(openai.BadRequestError) as bad:
            await in_thread(lambda: oai.chat.completions.create(
                model=model, messages=messages, response_format={"type": "json_schema", "json_schema": {
                    "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nonsense"}}}}}))
        with pytest.raises(openai.BadRequestError) as kind:
            await in_thread(lambda: oai.chat.completions.create(model=model, messages=messages,
                                                                response_format={"type": "yaml"}))
    obj = json.loads(strict.choices[0].message.content)
    assert set(obj) == {"answer", "why"} and isinstance(obj["answer"], int) and strict.choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in loose if c.choices)
    if [c.choices[0].finish_reason for c in loose if c.choices][-1] == "stop":  # random weights may ramble in a string
        assert isinstance(json.loads(text), dict)
    assert text.startswith("{") and "\n" not in text
    assert bad.value.body["code"] == "invalid_request" and "json_schema" in bad.value.body["message"]
    assert kind.value.body["param"] == "response_format"


async def test_tool_calls_forced_named_and_streamed(tiny_server):
    engine, url = tiny_server
    oai, model = client(url), engine.model_name
    messages = [{"role": "user", "content": "What's the weather in Paris?"}]
    tools = [WEATHER, CLOCK]
    with trio.fail_after(TIMEOUT):
        required = await in_thread(lambda: oai.chat.completions.create(
            model=model, messages=messages, tools=tools, tool_choice="required", max_tokens=200, temperature=0.7, seed=1))
        named = await in_thread(lambda: list(oai.chat.completions.create(
            model=model, messages=messages, tools=tools, max_tokens=200, temperature=0.7, seed=4, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})))
        call = required.choices[0].message.tool_calls[0]
        history = messages + [{"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                              {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
        after = await in_thread(lambda: oai.chat.completions.create(
            model=model, messages=history, tools=tools, tool_choice="none", max_tokens=8))
        with pytest.raises(openai.BadRequestError) as unknown:
            await in_thread(lambda: oai.chat.completions.create(
                model=model, messages=messages, tools=tools, tool_choice={"type": "function", "function": {"name": "nope"}}))
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert call.type == "function" and call.function.name in ("get_weather", "get_time") and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments), dict)
    deltas = [d for c in named if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather" and deltas[0].index == 0
    args = json.loads("".join(d.function.arguments or "" for d in deltas))
    assert set(args) == {"city"} and len(args["city"]) <= 12
    assert [c.choices[0].finish_reason for c in named if c.choices][-1] == "tool_calls"
    assert after.choices[0].message.tool_calls is None and after.choices[0].finish_reason in ("stop", "length")
    assert unknown.value.body["param"].startswith("tool_choice")
