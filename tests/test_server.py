"""`wasinn serve`: the real server (uvicorn on loopback) driven by the official `openai` client.

The model is the tiny random-weight GGUF (tests/tiny_gguf.py): its greedy output never ends
early, so max_tokens decides every length, and llama-cpp-python called directly is the
reference for texts and token counts.
"""

from __future__ import annotations

import dataclasses
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

llama_cpp = pytest.importorskip("llama_cpp")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
import httpx2 as httpx  # noqa: E402  (the HTTP client `openai` itself uses)
from llama_direct import host_model_params  # noqa: E402

from loopback import LoopbackServer  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.server import (ChatTemplate, Completion, GenerationRequest, LocalCompleter,  # noqa: E402
                           Message, Sampling, TextStream, create_app)
from wasinn.server._template import CHATML  # noqa: E402


class Server(LoopbackServer):
    pass


@pytest.fixture(scope="module")
def server(tiny: Path) -> Iterator[Server]:
    # no default chat model (unknown names are 404), a default embedding model
    host = Host(models=[f"tiny:GGML:AUTO:{tiny}"], module_cache=False)
    host.registry.preload_all()
    try:
        with Server(create_app(host, embedding_model="tiny", parallel=2)) as running:
            yield running
    finally:
        host.close()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="test", max_retries=0)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> llama_cpp.Llama:
    """llama-cpp-python on the same GGUF, with the host's model params (no extra buffers)."""
    with host_model_params():
        return llama_cpp.Llama(model_path=str(tiny), n_ctx=512, verbose=False)


def chatml(*turns: tuple[str, str]) -> str:
    return "".join(f"<|im_start|>{r}\n{c}<|im_end|>\n" for r, c in turns) + \
        "<|im_start|>assistant\n"


def n_tokens(llm: llama_cpp.Llama, text: str) -> int:
    return len(llm.tokenize(text.encode(), add_bos=True, special=True))


def metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line and not line.startswith("#")}


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Tell me a story"}]


# --- chat ------------------------------------------------------------------------------------


def test_chat_streamed_equals_whole_equals_llama_cpp_python(
        client: openai.OpenAI, reference: llama_cpp.Llama) -> None:
    before = time.time()
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16,
                                           temperature=0)
    prompt = chatml(("system", "You are terse."), ("user", "Tell me a story"))
    expected = reference.create_completion(prompt, max_tokens=16, temperature=0)
    choice = whole.choices[0]
    assert choice.message.content == expected["choices"][0]["text"] != ""
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert whole.object == "chat.completion" and whole.id.startswith("chatcmpl-")
    assert whole.model == "tiny" and before - 1 <= whole.created <= time.time() + 1
    assert whole.usage.prompt_tokens == n_tokens(reference, prompt)
    assert whole.usage.completion_tokens == 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 16

    chunks = list(client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and not any(finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_stop_sequences_end_the_answer_before_them(client: openai.OpenAI) -> None:
    greedy = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20,
                                            temperature=0).choices[0].message.content
    stop = greedy[5:8]
    for stops in (stop, ["never in the text", stop]):
        cut = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=20,
                                             temperature=0, stop=stops)
        assert cut.choices[0].message.content == greedy[:greedy.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        assert cut.usage.completion_tokens < 20
    chunks = list(client.chat.completions.create(model="tiny", messages=MESSAGES,
                                                 max_tokens=20, temperature=0, stop=[stop],
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == greedy[:greedy.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_sampling_parameters_reach_the_model(client: openai.OpenAI,
                                             reference: llama_cpp.Llama) -> None:
    settings = dict(max_tokens=12, temperature=0.9, top_p=0.8, seed=42, presence_penalty=0.5,
                    frequency_penalty=0.3)
    got = client.chat.completions.create(model="tiny", messages=MESSAGES, **settings)
    expected = reference.create_completion(
        chatml(("system", "You are terse."), ("user", "Tell me a story")), **settings)
    assert got.choices[0].message.content == expected["choices"][0]["text"]
    again = client.chat.completions.create(model="tiny", messages=MESSAGES, **settings)
    assert again.choices[0].message.content == got.choices[0].message.content
    other = client.chat.completions.create(model="tiny", messages=MESSAGES,
                                           **{**settings, "seed": 43})
    assert other.choices[0].message.content != got.choices[0].message.content


def test_two_concurrent_streams_get_what_they_get_alone(client: openai.OpenAI) -> None:
    prompts = ["Once upon a time", "The quick brown fox"]

    times: list[list[float]] = [[], []]

    def ask(i: int, gate: threading.Barrier | None = None) -> list[str]:
        if gate is not None:
            gate.wait()
        stream = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": prompts[i]}], max_tokens=200,
            temperature=0.8, seed=7, stream=True)
        pieces = []
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
            times[i].append(time.monotonic())
        return pieces

    alone = [ask(0), ask(1)]
    times = [[], []]
    gate = threading.Barrier(2)
    together: list[list[str]] = [[], []]
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, ask(i, gate)))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert together == alone
    assert alone[0] != alone[1]
    # they did run at once: each stream's first piece came before the other's last
    assert times[0][1] < times[1][-1] and times[1][1] < times[0][-1]


def test_a_stream_the_client_drops_stops_generating(client: openai.OpenAI,
                                                   server: Server) -> None:
    route = 'route="/v1/chat/completions"'
    tokens = f'wasinn_completion_tokens_total{{{route},model="tiny"}}'
    before = metrics(server)
    stream = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=450,
                                            temperature=0, stream=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 5
    while metrics(server)[f"wasinn_requests_in_progress{{{route}}}"] != 0:
        assert time.monotonic() < deadline, "the dropped stream is still counted in progress"
        time.sleep(0.01)
    after = metrics(server)
    assert after.get(tokens, 0) == before.get(tokens, 0)  # no answer: no tokens counted
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2,
                                          temperature=0).usage.completion_tokens == 2


def test_response_format_json_schema_constrains_the_answer(client: openai.OpenAI) -> None:
    schema = {"enum": ["red", "green"]}
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Colour?"}], max_tokens=16,
        temperature=0.9, seed=5,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}})
    assert json.loads(answer.choices[0].message.content) in ("red", "green")
    assert answer.choices[0].finish_reason == "stop"


# --- completions -----------------------------------------------------------------------------


def test_completions_whole_and_streamed(client: openai.OpenAI,
                                        reference: llama_cpp.Llama) -> None:
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=10,
                                      temperature=0)
    expected = reference.create_completion("Once upon a time", max_tokens=10, temperature=0)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == expected["choices"][0]["text"]
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.prompt_tokens == n_tokens(reference, "Once upon a time")
    assert whole.usage.completion_tokens == 10
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time",
                                            max_tokens=10, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


# --- embeddings ------------------------------------------------------------------------------


def test_embeddings(client: openai.OpenAI) -> None:
    texts = ["a small test", "something else entirely"]
    result = client.embeddings.create(model="tiny", input=texts)  # base64 on the wire
    vectors = np.array([d.embedding for d in result.data])
    assert vectors.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert float(vectors[0] @ vectors[1]) < 0.999
    assert result.model == "tiny" and result.usage.prompt_tokens > 2
    as_floats = client.embeddings.create(model="tiny", input=texts[0], encoding_format="float")
    np.testing.assert_allclose(as_floats.data[0].embedding, vectors[0], atol=1e-6)
    # a model this server does not offer: the default embedding model answers
    fallback = client.embeddings.create(model="text-embedding-3-small", input=texts[0])
    assert fallback.model == "tiny"
    np.testing.assert_allclose(fallback.data[0].embedding, vectors[0], atol=1e-6)


# --- the rest --------------------------------------------------------------------------------


def test_models_health_and_metrics(client: openai.OpenAI, server: Server) -> None:
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert client.models.retrieve("tiny").owned_by == "wasinn"
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"

    before = metrics(server)
    result = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=5,
                                            temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=MESSAGES)
    after = metrics(server)
    route = 'route="/v1/chat/completions"'

    def delta(key: str) -> float:
        return after.get(key, 0) - before.get(key, 0)

    assert delta(f'wasinn_requests_total{{{route},model="tiny",status="200"}}') == 1
    assert delta(f'wasinn_requests_total{{{route},model="",status="404"}}') == 1
    assert delta(f'wasinn_prompt_tokens_total{{{route},model="tiny"}}') == \
        result.usage.prompt_tokens
    assert delta(f'wasinn_completion_tokens_total{{{route},model="tiny"}}') == 5
    assert delta(f'wasinn_request_duration_seconds_count{{{route}}}') == 2
    response = httpx.get(f"{server.url}/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "# TYPE wasinn_requests_total counter" in response.text


def test_errors_are_openai_errors(client: openai.OpenAI, server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert e.value.code == "model_not_found" and "tiny" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4o", prompt="hi")
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny", messages=MESSAGES, n=2, stream=stream)
        assert e.value.param == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=5)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", max_tokens=4,
                                       messages=[{"role": "user", "content": "word " * 600}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="tiny", input="")

    bad = httpx.post(f"{server.url}/v1/chat/completions", content=b'{"model": "tiny", ',
                     headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in bad.json()["error"]["message"]
    missing = httpx.get(f"{server.url}/v1/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


class Wrapper:
    """A Completer in front of another, as a cache will be: it sees every request, may answer
    itself, and sets response headers."""

    def __init__(self, inner: LocalCompleter) -> None:
        self.inner = inner
        self.seen: list[GenerationRequest] = []

    def models(self) -> list[str]:
        return self.inner.models()

    async def complete(self, request: GenerationRequest) -> Completion:
        self.seen.append(request)
        if request.messages and request.messages[-1].content == "fail":
            raise RuntimeError("boom")
        completion = await self.inner.complete(request)
        return dataclasses.replace(completion, headers={"x-wrapped": "whole"})

    async def stream(self, request: GenerationRequest) -> TextStream:
        self.seen.append(request)
        inner = await self.inner.stream(request)

        async def source() -> AsyncIterator[str | Completion]:
            async for piece in inner:
                yield piece
            if inner.completion is not None:
                yield inner.completion

        return TextStream(source(), headers={"x-wrapped": "stream"})


def test_a_completer_in_front_of_the_local_one(tiny: Path) -> None:
    host = Host(models=[f"tiny:GGML:AUTO:{tiny}"], module_cache=False)
    wrapper = Wrapper(LocalCompleter(host.registry))
    try:
        with Server(create_app(host, completer=wrapper)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="tenant-a",
                                   max_retries=0)
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", messages=MESSAGES, max_tokens=4, temperature=0)
            assert raw.headers["x-wrapped"] == "whole"
            assert raw.parse().usage.completion_tokens == 4
            with client.chat.completions.with_streaming_response.create(
                    model="tiny", messages=MESSAGES, max_tokens=4, temperature=0,
                    stream=True) as streamed:
                assert streamed.headers["x-wrapped"] == "stream"
                text = "".join(c.choices[0].delta.content or "" for c in streamed.parse())
            assert text == raw.parse().choices[0].message.content
            with pytest.raises(openai.InternalServerError):
                client.chat.completions.create(model="tiny", messages=[
                    {"role": "user", "content": "fail"}])
    finally:
        wrapper.inner.close()
        host.close()
    first = wrapper.seen[0]
    assert first.caller.api_key == "tenant-a"
    assert first.caller.headers["authorization"] == "Bearer tenant-a"
    assert first.messages == (Message("system", "You are terse."),
                              Message("user", "Tell me a story"))
    assert first.sampling == Sampling(max_tokens=4, temperature=0.0)


# --- chat templates --------------------------------------------------------------------------


def test_chat_template_fallback_and_bos() -> None:
    turns = (Message("user", "hi"), Message("assistant", "hello"), Message("user", "bye"))
    assert ChatTemplate(CHATML).render(turns) == \
        chatml(("user", "hi"), ("assistant", "hello"), ("user", "bye"))
    llama3ish = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                 "{% endfor %}[assistant]")
    # the backend adds the model's BOS itself: one written by the template would be a second
    assert ChatTemplate(llama3ish, "<s>", "</s>", model_adds_bos=True).render(turns[:1]) == \
        "[user]hi[assistant]"
    assert ChatTemplate(llama3ish, "<s>", "</s>").render(turns[:1]) == "<s>[user]hi[assistant]"


# --- the command line ------------------------------------------------------------------------


def test_cli_serve_help_lists_the_flags() -> None:
    result = subprocess.run([sys.executable, "-m", "wasinn", "serve", "--help"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for flag in ("--host", "--port", "--nn-preload", "--chat-model", "--embedding-model",
                 "--threads", "--parallel", "--config"):
        assert flag in result.stdout


def test_cli_serve_from_a_config_file(tiny: Path, tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(tiny.read_bytes())
    config = tmp_path / "serve.toml"
    config.write_text('nn-preload = ["tiny:GGML:AUTO:models/tiny.gguf"]\n'  # relative to it
                      'chat-model = "tiny"\nport = 0\nthreads = 1\n'
                      'cache = "cache.sqlite"\n')  # the semantic cache, beside the config
    process = subprocess.Popen([sys.executable, "-m", "wasinn", "serve", "--config", str(config)],
                               stderr=subprocess.PIPE, text=True)
    try:
        url = None
        assert process.stderr is not None
        for line in process.stderr:
            found = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if found:
                url = found.group(1)
                break
        assert url, "the server did not start"
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="test", max_retries=0)
        # a model name the server does not offer: --chat-model answers
        answer = client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES,
                                                max_tokens=3, temperature=0)
        assert answer.model == "tiny" and answer.usage.completion_tokens == 3
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down gracefully
        rest = process.communicate(timeout=10)[1]
    assert process.returncode == 0
    assert "Application shutdown complete" in rest
    assert (tmp_path / "cache.sqlite").is_file()


def test_cli_serve_refuses_a_bad_default(tiny: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "wasinn", "serve", "--port", "0", "--no-cache",
                             "--nn-preload", f"tiny:GGML:AUTO:{tiny}", "--chat-model", "nobody"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "--chat-model 'nobody'" in result.stderr
