"""`wasinn serve --route`: guests as HTTP handlers (WAGI-style), over real HTTP on loopback.

The guests are guests/edge_classify.c (the real EfficientNet-Lite0, checked against
onnxruntime), guests/edge_chat.c (the tiny random-weight GGUF, whose greedy output never ends
early, so n_predict decides its length) and guests/edge_test.c (CGI variables, statuses and
every way a guest can fail).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("uvicorn")
import httpx2 as httpx  # noqa: E402

from loopback import LoopbackServer  # noqa: E402
from wasinn import Host  # noqa: E402
from wasinn.cli import (EXIT_USAGE, ROUTE_AHEAD, ROUTE_WORKERS, ConfigError,  # noqa: E402
                        build_parser, main, merge_serve_config, route_slots)
from wasinn.server import (WagiPool, WagiRequest, WagiResponse, WagiRoute,  # noqa: E402
                           create_app)
from wasinn.server._wagi import parse_cgi  # noqa: E402

N_PREDICT = 8
TIMEOUT = 0.5  # the test route's deadline, for the guest that loops forever
MAX_MEMORY = 16 << 20


@pytest.fixture(scope="module")
def host(example_assets: Path, tiny: Path) -> Iterator[Host]:
    model = example_assets / "efficientnet-lite0" / "model.onnx"
    host = Host(models=[f"efficientnet-lite0:onnx:cpu:{model}", f"tiny:GGML:AUTO:{tiny}"],
                module_cache=False,
                instance_pool=route_slots(ROUTE_WORKERS, 3))  # as serve has it
    host.registry.preload_all()
    yield host
    host.close()


@pytest.fixture(scope="module")
def server(host: Host, guests: dict[str, Path], example_assets: Path) -> Iterator[str]:
    pool = WagiPool(workers=4, queue=8)
    routes = [
        WagiRoute(host, guests["edge_classify"], route="/classify",
                  dirs=[f"{example_assets}:/data"], pool=pool),
        WagiRoute(host, guests["edge_chat"], route="/chat",
                  env={"MODEL": "tiny", "N_PREDICT": str(N_PREDICT), "TEMP": "0"}, pool=pool),
        WagiRoute(host, guests["edge_test"], route="/test", env={"GREETING": "hello"},
                  timeout=TIMEOUT, max_memory=MAX_MEMORY, pool=pool),
    ]
    try:
        with LoopbackServer(create_app(host, routes=routes)) as running:
            yield running.url
    finally:
        pool.close()
        for route in routes:
            route.close()


def top5_of(response: httpx.Response) -> list[tuple[int, str, float]]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    return [(row["class"], row["label"], row["p"]) for row in response.json()["top5"]]


def expected_top5(reference, assets: Path) -> list[tuple[int, float, str]]:
    return reference.top5(assets / "efficientnet-lite0" / "model.onnx", assets / "chelsea.ppm",
                          reference.load_labels(assets / "imagenet_labels.txt"))


# --- the classifier ------------------------------------------------------------------------

def test_classify_route_matches_onnxruntime(server: str, example_assets: Path,
                                            reference) -> None:
    response = httpx.post(f"{server}/classify", content=(example_assets / "chelsea.ppm")
                          .read_bytes(), headers={"Content-Type": "image/x-portable-pixmap"})
    got = top5_of(response)
    assert response.json()["model"] == "efficientnet-lite0"
    expected = expected_top5(reference, example_assets)
    assert [(c, label) for c, label, _ in got] == [(c, label) for c, _, label in expected]
    for (_, _, p_guest), (_, p_ref, _) in zip(got, expected):
        assert p_guest == pytest.approx(p_ref, abs=1e-4)
    assert got[0][:2] == (285, "Egyptian cat")


def test_classify_resizes_and_crops_like_prepare(server: str, example_assets: Path,
                                                 reference) -> None:
    """The full 451x300 photo (with a header comment): the guest's resize and centre crop
    give the classes prepare.py's Pillow crop gives (pixels may differ by rounding)."""
    skimage_data = pytest.importorskip("skimage.data")
    pixels = skimage_data.chelsea()
    height, width, _ = pixels.shape
    ppm = f"P6\n# chelsea\n{width} {height}\n255\n".encode() + np.ascontiguousarray(
        pixels, dtype=np.uint8).tobytes()
    response = httpx.post(f"{server}/classify", content=ppm)
    got = top5_of(response)
    assert (response.json()["width"], response.json()["height"]) == (451, 300)
    expected = expected_top5(reference, example_assets)
    assert [c for c, _, _ in got] == [c for c, _, _ in expected]
    for (_, _, p_guest), (_, p_ref, _) in zip(got, expected):
        assert p_guest == pytest.approx(p_ref, abs=0.01)


@pytest.mark.parametrize("body,reason", [
    (b"", "not a binary PPM"),
    (b"GIF89a....", "not a binary PPM"),
    (b"P6\n224 224\n", "malformed PPM header"),
    (b"P6\n2 2\n65535\n" + bytes(24), "maxval"),
    (b"P6\n224 224\n255\n" + bytes(100), "truncated pixel data"),
    (b"P6\n100000 100000\n255\n", "too large"),
])
def test_classify_bad_input_is_400(server: str, body: bytes, reason: str) -> None:
    response = httpx.post(f"{server}/classify", content=body)
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/plain")
    assert reason in response.text


# --- the chat model --------------------------------------------------------------------------

def test_chat_route_generates(server: str) -> None:
    response = httpx.post(f"{server}/chat", content="Say hello.".encode())
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.strip()
    assert int(response.headers["x-output-tokens"]) == N_PREDICT
    assert int(response.headers["x-input-tokens"]) > 3
    again = httpx.post(f"{server}/chat", content="Say hello.".encode())
    assert again.text == response.text  # greedy, and no state kept between requests
    short = httpx.post(f"{server}/chat?n_predict=2", content="Say hello.".encode())
    assert int(short.headers["x-output-tokens"]) == 2


def test_chat_route_needs_a_prompt(server: str) -> None:
    response = httpx.post(f"{server}/chat", content=b"")
    assert response.status_code == 400 and "prompt" in response.text


# --- CGI in and out --------------------------------------------------------------------------

def echo(text: str) -> dict[str, str]:
    head, _, body = text.partition("body=")
    values = dict(line.split("=", 1) for line in head.splitlines())
    values["body"] = body
    return values


def test_cgi_variables(server: str) -> None:
    response = httpx.post(f"{server}/test/echo?a=1&b=two", content=b"the body",
                          headers={"X-Request-Id": "r-1", "Content-Type": "text/x-test"})
    assert response.status_code == 200
    assert response.headers["x-served"] == "1"
    port = server.rsplit(":", 1)[1]
    assert echo(response.text) == {
        "REQUEST_METHOD": "POST", "SCRIPT_NAME": "/test", "PATH_INFO": "/echo",
        "QUERY_STRING": "a=1&b=two", "CONTENT_TYPE": "text/x-test", "CONTENT_LENGTH": "8",
        "SERVER_NAME": "127.0.0.1", "SERVER_PORT": port, "SERVER_PROTOCOL": "HTTP/1.1",
        "GATEWAY_INTERFACE": "CGI/1.1", "REMOTE_ADDR": "127.0.0.1",
        "HTTP_X_REQUEST_ID": "r-1", "X_MATCHED_ROUTE": "/test/...", "GREETING": "hello",
        "served": "1", "body": "the body"}


def test_status_and_location_headers(server: str) -> None:
    response = httpx.get(f"{server}/test/status")
    assert (response.status_code, response.text) == (404, "no such thing\n")
    response = httpx.get(f"{server}/test/redirect", follow_redirects=False)
    assert response.status_code == 302 and response.headers["location"] == "/elsewhere"


@pytest.mark.parametrize("path,status,reason", [
    ("/trap", 500, "the guest trapped: wasm trap: wasm `unreachable` instruction executed"),
    ("/exit", 500, "the guest exited with status 3; its last words: edge_test: failing on "
                   "purpose"),
    ("/bad", 500, "the guest's output is not a CGI response: not a header line: "
                  "'this is not a header'"),
    ("/loop", 504, f"the guest ran past its {TIMEOUT:g} s deadline"),
    (f"/grow?mb={2 * MAX_MEMORY >> 20}", 500, "the guest trapped"),
])
def test_a_failing_guest_is_an_error_and_the_server_goes_on(server: str, path: str,
                                                              status: int, reason: str) -> None:
    response = httpx.get(f"{server}/test{path}")
    assert response.status_code == status
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text.startswith(reason)
    assert httpx.get(f"{server}/test/echo").status_code == 200


def test_memory_under_the_limit_is_fine(server: str) -> None:
    response = httpx.get(f"{server}/test/grow?mb=2")
    assert (response.status_code, response.text) == (200, "grew 2 MiB\n")


def test_concurrent_requests_do_not_share_state(server: str) -> None:
    results: dict[int, httpx.Response] = {}

    def call(i: int) -> None:
        results[i] = httpx.post(f"{server}/test/echo?i={i}", content=f"body {i}".encode(),
                                headers={"X-Request-Id": str(i)}, timeout=30)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, response in results.items():
        assert response.status_code == 200
        seen = echo(response.text)
        assert (seen["HTTP_X_REQUEST_ID"], seen["QUERY_STRING"], seen["body"],
                seen["served"]) == (str(i), f"i={i}", f"body {i}", "1")
    assert len(results) == 8


def test_saturated_pool_is_503(host: Host, guests: dict[str, Path]) -> None:
    pool = WagiPool(workers=1, queue=0)
    route = WagiRoute(host, guests["edge_test"], route="/one", timeout=1.0, pool=pool)
    try:
        with LoopbackServer(create_app(host, routes=[route])) as running:
            slow: list[httpx.Response] = []
            busy = threading.Thread(
                target=lambda: slow.append(httpx.get(f"{running.url}/one/loop", timeout=30)))
            busy.start()
            while pool.admitted == 0 and busy.is_alive():  # until the loop holds the worker
                threading.Event().wait(0.005)
            refused = httpx.get(f"{running.url}/one/echo")
            busy.join()
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            assert "all 1 workers are busy" in refused.text
            assert slow[0].status_code == 504
            assert httpx.get(f"{running.url}/one/echo").status_code == 200
    finally:
        pool.close()
        route.close()


# --- the runner without HTTP (as a bench drives it) ------------------------------------------

@pytest.mark.parametrize("reuse_linking", [True, False])
def test_runner_called_directly(host: Host, guests: dict[str, Path], example_assets: Path,
                                reference, reuse_linking: bool) -> None:
    route = WagiRoute(host, guests["edge_classify"], route="/classify",
                      dirs=[f"{example_assets}:/data"], reuse_linking=reuse_linking)
    response = route.handle(WagiRequest(method="POST", path="/classify",
                                        body=(example_assets / "chelsea.ppm").read_bytes()))
    assert response.status == 200 and response.error is None
    got = json.loads(response.body)["top5"]
    expected = expected_top5(reference, example_assets)
    assert [row["class"] for row in got] == [c for c, _, _ in expected]
    timings = response.timings
    assert set(timings) == {"setup", "instantiate", "run", "compute", "parse", "total"}
    assert 0 < timings["compute"] < timings["run"] < timings["total"]  # the inference, inside
    route.close()


def test_a_pre_initialized_guest_on_a_route(host: Host, guests: dict[str, Path],
                                            example_assets: Path, reference,
                                            tmp_path: Path) -> None:
    """edge_classify snapshotted with the model bound and the labels read: every request's
    store gets graph 0 bound again, and the answers are the un-snapshotted guest's."""
    from wasinn.preinit import preinitialize
    from wasinn.host import Preopen

    made = preinitialize(guests["edge_classify"].read_bytes(), host, engine="wasinn",
                         env={"MODEL": "efficientnet-lite0",
                              "LABELS": "/data/imagenet_labels.txt"},
                         dirs=[Preopen.parse(f"{example_assets}:/data")])
    assert made.record is not None
    assert [(b.handle, b.name) for b in made.record.graphs] == [(0, "efficientnet-lite0")]
    snapshot = tmp_path / "edge_classify.pre.wasm"
    snapshot.write_bytes(made.wasm)
    # no preopen this time: the labels come from the snapshot's memory
    route = WagiRoute(host, snapshot, route="/classify")
    body = (example_assets / "chelsea.ppm").read_bytes()
    try:
        for _ in range(2):  # and again, from a fresh instance
            response = route.handle(WagiRequest(method="POST", path="/classify", body=body))
            assert response.status == 200, response.error
            got = json.loads(response.body)["top5"]
            expected = expected_top5(reference, example_assets)
            assert [(r["class"], r["label"]) for r in got] == [(c, label)
                                                               for c, _, label in expected]
    finally:
        route.close()
    other = Host(module_cache=False)  # offers no model: the route is refused at start
    try:
        with pytest.raises(ValueError, match="efficientnet-lite0"):
            WagiRoute(other, snapshot, route="/classify")
    finally:
        other.close()


def test_output_over_the_limit_is_500(host: Host, guests: dict[str, Path]) -> None:
    route = WagiRoute(host, guests["edge_test"], route="/test", max_output=64)
    try:
        response = route.handle(WagiRequest(method="POST", path="/test/echo",
                                            body=b"x" * 4096))
        assert response.status == 500
        assert "more than 64 bytes" in response.body.decode()
        fine = route.handle(WagiRequest(method="GET", path="/test/status"))
        assert fine.status == 404  # the next request is served as usual
    finally:
        route.close()


def test_stderr_keeps_the_last_words(host: Host, guests: dict[str, Path]) -> None:
    """A guest's stderr is a file: its last 4 KiB make the 500's reason, whatever came first
    (64 KiB here); past 1 MiB its writes fail, and the request still ends."""
    route = WagiRoute(host, guests["edge_test"], route="/test")
    try:
        for noise in (64, 2048):
            response = route.handle(WagiRequest(path="/test/exit", query=f"noise={noise}"))
            assert response.status == 500
            body = response.body.decode()
            assert body.startswith("the guest exited with status 3")
            if noise == 64:
                assert body.endswith("its last words: edge_test: failing on purpose\n")
    finally:
        route.close()


def _echo(route: WagiRoute, body: bytes) -> WagiResponse:
    return route.handle(WagiRequest(method="POST", path="/test/echo", body=body))


def test_output_files_that_cannot_be_made(host: Host, guests: dict[str, Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """No in-memory file (e.g. out of descriptors): the request's output goes through Python
    callbacks instead; one that cannot be opened by wasmtime: a 500, and the route goes on."""
    from wasinn.server import _wagi

    route = WagiRoute(host, guests["edge_test"], route="/test")
    route._native_wasi = None  # the Python steps (what runs where C's fail, or are not built)
    try:
        def no_memfd(*args: object, **kwargs: object) -> None:
            raise OSError(24, "Too many open files")

        with monkeypatch.context() as m:
            m.setattr(_wagi._FileCapture, "__init__", no_memfd)
            slow = _echo(route, b"hi")
        assert slow.status == 200 and slow.body.endswith(b"hi")
        with monkeypatch.context() as m:
            m.setattr(_wagi._FileCapture, "attach", no_memfd)
            failed = route.handle(WagiRequest(path="/test/echo"))
        assert failed.status == 500
        assert failed.body.startswith(b"the guest could not start: [Errno 24]")
        assert _echo(route, b"again").body.endswith(b"again")
    finally:
        route.close()


def test_finished_stores_go_and_their_slots_come_back(example_assets: Path,
                                                      guests: dict[str, Path]) -> None:
    """Stores are deleted after their responses (in C): with 2 pooled slots, 12 requests
    in a row each get one (a request that finds every slot held waits for the deletes)."""
    host = Host(module_cache=False, instance_pool=2)
    route = WagiRoute(host, guests["edge_test"], route="/test")
    try:
        for i in range(12):
            response = _echo(route, f"request {i}".encode())
            assert response.status == 200, response.body
            assert response.body.endswith(f"request {i}".encode())
    finally:
        route.close()
        host.close()


def test_route_environment_and_cgi_variables(host: Host, guests: dict[str, Path]) -> None:
    """The route's environment, then the request's CGI variables, which replace a route's
    variable of the same name (each name once)."""
    for env in ({"GREETING": "hi"}, {"GREETING": "hi", "REQUEST_METHOD": "FROM-ROUTE",
                                     "HTTP_X_REQUEST_ID": "route"}):
        route = WagiRoute(host, guests["edge_test"], route="/test", env=env)
        try:
            response = route.handle(WagiRequest(method="PUT", path="/test/echo",
                                                headers=[("X-Request-Id", "7")]))
            seen = echo(response.body.decode())
            assert (seen["GREETING"], seen["REQUEST_METHOD"], seen["HTTP_X_REQUEST_ID"]) == (
                "hi", "PUT", "7")
            assert route._environ(WagiRequest(method="PUT", path="/test/echo"))[
                "REQUEST_METHOD"] == "PUT"
        finally:
            route.close()


def test_instances_made_ahead(host: Host, guests: dict[str, Path]) -> None:
    """Where the native path is built, a route keeps an instance made ahead for its next
    request: each request still gets a fresh one (its globals as the module starts them), its
    own WASI, and the route's memory limit and deadline."""
    route = WagiRoute(host, guests["edge_test"], route="/test", max_memory=MAX_MEMORY,
                      timeout=TIMEOUT)
    try:
        assert route.ahead == (0 if host._abi.fast is None else 1)
        for i in range(4):
            route.settle()  # the next instance is made
            response = _echo(route, f"body {i}".encode())
            seen = echo(response.body.decode())
            assert (seen["body"], seen["served"]) == (f"body {i}", "1")
            if route.ahead:  # no instantiation inside the request
                assert response.timings["instantiate"] == 0
        over = route.handle(WagiRequest(path="/test/grow", query=f"mb={2 * MAX_MEMORY >> 20}"))
        assert over.status == 500 and over.body.startswith(b"the guest trapped")
        assert route.handle(WagiRequest(path="/test/loop")).status == 504
        assert route.handle(WagiRequest(path="/test/grow", query="mb=2")).body == b"grew 2 MiB\n"
    finally:
        route.close()


# a WASI command with a start function: it runs as the module is instantiated
_STARTS = r"""
(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "Content-Type: text/plain\n\nstarted ")
  (global $started (mut i32) (i32.const 48))
  (func $init (global.set $started (i32.add (global.get $started) (i32.const 1))))
  (start $init)
  (func (export "_start")
    (i32.store8 (i32.const 50) (global.get $started))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 35))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
"""


def test_a_module_with_a_start_function_gets_none_made_ahead(host: Host,
                                                             tmp_path: Path) -> None:
    """Its start function is guest code: it runs in the request, after the request's WASI is
    set, as a fresh instance's (once)."""
    import wasmtime

    module = tmp_path / "starts.wasm"
    module.write_bytes(wasmtime.wat2wasm(_STARTS))
    route = WagiRoute(host, module, route="/s")
    try:
        assert route.ahead == 0
        for _ in range(2):
            response = route.handle(WagiRequest(path="/s"))
            assert (response.status, response.body) == (200, b"started 1")
    finally:
        route.close()


def test_parse_cgi() -> None:
    answer = parse_cgi(b"Content-Type: text/plain\r\nStatus: 201 Created\r\nX-A: 1\r\n\r\nok")
    assert (answer.status, answer.headers, answer.body) == (
        201, [("Content-Type", "text/plain"), ("X-A", "1")], b"ok")
    answer = parse_cgi(b"Location:\t/x \t\nX-Empty:\n\n")  # blanks around values go
    assert (answer.status, answer.headers) == (302, [("Location", "/x"), ("X-Empty", "")])
    for output, reason in [(b"", "wrote nothing"), (b"Content-Type: text/plain\n", "no blank"),
                           (b"X-A: 1\n\n", "neither a Content-Type"),
                           (b": a\nContent-Type: a/b\n\n", "not a header line"),
                           (b"Bad Name: a\nContent-Type: a/b\n\n", "not a header line"),
                           (b"No colon\nContent-Type: a/b\n\n", "not a header line"),
                           (b"Status: teapot\nContent-Type: a/b\n\n", "not a status")]:
        with pytest.raises(ValueError, match=reason):
            parse_cgi(output)


# --- the command line ------------------------------------------------------------------------

def test_route_options_and_config(tmp_path: Path) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('route = ["/classify=guests/edge_classify.wasm"]\n'
                      'route-dir = ["assets:/data"]\n'
                      'route-env = ["MODEL=efficientnet-lite0"]\n'
                      'route-timeout = 5\nroute-max-memory = "64M"\nroute-workers = 2\n'
                      'route-ahead = 0\n')
    args = merge_serve_config(build_parser().parse_args(
        ["serve", "--config", str(config), "--route", "/chat=chat.wasm", "--route-queue", "0"]))
    assert args.route == [f"/classify={tmp_path}/guests/edge_classify.wasm", "/chat=chat.wasm"]
    assert args.route_dir == [f"{tmp_path}/assets:/data"]
    assert args.route_env == ["MODEL=efficientnet-lite0"]
    assert (args.route_timeout, args.route_max_memory, args.route_workers,
            args.route_queue, args.route_ahead) == (5.0, "64M", 2, 0, 0)
    assert route_slots(2, 2, 0) == 6 and route_slots(2, 2, 1) == 8
    default = merge_serve_config(build_parser().parse_args(["serve"]))
    assert default.route_ahead == ROUTE_AHEAD
    with pytest.raises(ConfigError, match="--route-ahead"):
        merge_serve_config(build_parser().parse_args(["serve", "--route-ahead", "9"]))


def test_bad_routes_get_a_clear_error(tiny: Path, guests: dict[str, Path],
                                      capsys: pytest.CaptureFixture[str]) -> None:
    base = ["serve", "--no-cache", "--nn-preload", f"tiny:GGML:AUTO:{tiny}"]
    cases = {
        ("--route", "classify.wasm"): "expected /PATH=MODULE.wasm",
        ("--route", "/x=/no/such.wasm"): "no such module",
        ("--route", f"/v1/chat={guests['edge_test']}"): "the OpenAI API's paths are taken",
        ("--route", f"/x={guests['bench']}"): "not a WASI command",
        ("--route", f"/x={guests['edge_test']}", "--route-workers", "0"): "at least 1",
        ("--route", f"/x={guests['edge_test']}", "--route-max-memory", "lots"): "not a size",
    }
    for flags, message in cases.items():
        assert main([*base, *flags]) == EXIT_USAGE, flags
        assert message in capsys.readouterr().err, flags


def test_wasi_set_in_c_falls_back_to_python(host: Host, guests: dict[str, Path],
                                            tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A request's WASI is set in one C call where the native path is built; where that
    fails, Python does the same steps and says what failed: here a preopened directory that
    went away (a 500), then is back (served again)."""
    from wasinn._native import NativeWasi

    data = tmp_path / "data"
    data.mkdir()
    route = WagiRoute(host, guests["edge_test"], route="/test", dirs=[f"{data}:/data"],
                      env={"GREETING": "a=b"})
    try:
        if route._native_wasi is None:
            pytest.skip("the native path is not built here")
        # a NUL ends a value there, as in any C string: it never makes a variable of its own
        echoed = route.handle(WagiRequest(method="POST", path="/test/echo", body=b"hi",
                                          headers=[("X-Request-Id", "abc\0GREETING=no")]))
        assert echoed.status == 200 and echoed.body.endswith(b"hi")
        lines = echoed.body.decode().splitlines()
        assert "HTTP_X_REQUEST_ID=abc" in lines and "GREETING=a=b" in lines
        assert "PATH_INFO=/echo" in lines and "REQUEST_METHOD=POST" in lines
        with monkeypatch.context() as m:
            m.setattr(NativeWasi, "set", lambda *args: None)
            slow = _echo(route, b"hey")
        assert slow.status == 200 and slow.body.endswith(b"hey")
        data.rmdir()
        gone = route.handle(WagiRequest(path="/test/echo"))
        assert gone.status == 500
        assert gone.body.startswith(b"the guest could not start: failed to add preopen dir")
        data.mkdir()
        assert _echo(route, b"back").body.endswith(b"back")
    finally:
        route.close()


def test_a_directory_replaced_is_seen_by_the_next_request(host: Host, guests: dict[str, Path],
                                                           tmp_path: Path) -> None:
    """Each request opens the route's preopened directories anew (not ahead, with the next
    requests' output files): one renamed away and replaced, or deleted and made again, is
    what the next request sees."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("one")
    route = WagiRoute(host, guests["edge_test"], route="/test", dirs=[f"{data}:/data"])

    def cat() -> bytes:
        response = route.handle(WagiRequest(path="/test/cat", query="file=a.txt"))
        route.settle()  # the next requests' configs are made before any change
        assert response.status in (200, 404), response.body
        return response.body

    try:
        route.settle()
        assert cat() == b"one"
        (data / "a.txt").write_text("one, changed")  # the same directory: seen as it is
        assert cat() == b"one, changed"
        data.rename(tmp_path / "old")
        data.mkdir()
        (data / "a.txt").write_text("two")
        assert cat() == b"two"
        assert cat() == b"two"
        (data / "a.txt").unlink()
        data.rmdir()
        data.mkdir()
        assert cat().startswith(b"no /data/a.txt")
    finally:
        route.close()


_FILES_AHEAD = """
import gc, json, os, sys
from wasinn import Host
from wasinn.server import WagiRequest, WagiRoute

def output_files():
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "memfd:wasinn" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # closed meanwhile
    return count

host = Host(module_cache=False)
before = output_files()
route = WagiRoute(host, sys.argv[1], route="/test")
bodies = []
for i in range(12):
    echoed = route.handle(WagiRequest(method="POST", path="/test/echo", body=b"request %d" % i))
    failed = route.handle(WagiRequest(path="/test/exit"))
    bodies.append([echoed.status, echoed.body.decode(), failed.body.decode()])
route.settle()
ahead = output_files() - before
native = route._native_wasi is not None
route.close()
gc.collect()
print(json.dumps({"bodies": bodies, "ahead": ahead, "native": native,
                  "left": output_files() - before}))
host.close()
"""


def test_output_files_made_ahead_leave_no_descriptor_behind(guests: dict[str, Path]) -> None:
    """Where the native path is built, a route's reaper thread makes the next requests'
    stdout and stderr files ahead: each request gets its own (no output seen twice), and
    once the route is closed every descriptor of those files (its own, wasmtime's) is
    closed. In a process of its own: other tests' routes make theirs at their own pace."""
    run = subprocess.run([sys.executable, "-c", _FILES_AHEAD, str(guests["edge_test"])],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for i, (status, echoed, failed) in enumerate(result["bodies"]):
        assert status == 200 and echoed.endswith(f"body=request {i}")
        assert failed.endswith("its last words: edge_test: failing on purpose\n")
    if result["native"]:
        assert result["ahead"] > 0  # the next requests' files were ready, open
    assert result["left"] == 0
