"""What an edge route costs per request, cold start cut step by step, and its throughput.

    python bench/edge.py [--requests N] [--clients 1,2,4] [--duration S] [--quick]

The route: guests/edge_classify.c, WAGI-style (`wasinn serve --route`), classifying a
224x224 PPM (the example's photo, so the guest takes it as it is, with no resize) with
EfficientNet-Lite0 through load_by_name. Each request is a fresh instance.

Part 1, per-request latency in process (`WagiRoute.handle`: a new Store, WASI with the body
on stdin, instantiate, `_start`, parse the CGI answer), for each way to start an instance, on
a Host made as `wasinn serve --route` makes it (pooled instance slots, onnxruntime's threads
idle between runs). After each request the bench waits, untimed, for the route's Store to be
deleted and the next request's output files (and, in step 6, Store and instance) made (all
after the response, on the route's own thread), so that none runs inside the next timing
(over HTTP, part 2, that work runs beside the next request, on the other core):

1. cold: the module compiled for every request (no module cache), then linked;
2. module cache: the compiled module read back from the on-disk cache for every request
   (`Module.deserialize_file`), then linked;
3. linked per request: the module compiled once, in memory; the imports resolved per
   request (`Linker.instantiate`);
4. linking reused: one `InstancePre` for all requests;
5. pre-initialized: `wasinn preinit` ran the guest's init once (model bound by name, labels
   read); every instance starts from that snapshot, from one `InstancePre`;
6. instance made ahead (what `wasinn serve --route` runs): step 5, and the route's own C
   thread makes the next request's Store and instance after each response, so that the
   request sets its WASI and wasi-nn state on one and runs it. The work is moved, not gone:
   it happens between requests (here in the untimed wait after each), on the other core.

Beside each step, the inference inside the request on its own: onnxruntime's `run` on the
same session with the same input, timed in the same rounds (the two alternate, so noise hits
both). `over inference` = p50 request - p50 inference. `over its own` = the median, over
requests, of the request less the inference inside it (the time in wasi-nn compute, which
the route reports): the target's measure, as it is immune to the drift of the machine
between the separate runs. Target (issue 7): a warm request (steps 4 to 6) costs <= 1 ms
more than the inference inside it.

Part 2, requests per second over HTTP: `wasinn serve --route /classify=...` (pre-initialized
module, linking reused) in a subprocess on loopback, N clients each with one request in flight
on a keep-alive connection, for each `--clients` level; every answer is checked (200, the same
top-1 class).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _common import (CLASSIFIER, EXAMPLE_OUT, IMAGE, GUESTS_OUT, HttpConnection, Server,
                     build_guests, classifier_input, prepare_classifier, print_table)
from wasinn.backends.onnx import OnnxGraph
from wasinn.cli import ROUTE_AHEAD, ROUTE_WORKERS, SERVER_BACKENDS, route_slots
from wasinn.host import Host, Preopen
from wasinn.preinit import preinitialize
from wasinn.server import WagiRequest, WagiResponse, WagiRoute


MODEL = "efficientnet-lite0"
LABELS = EXAMPLE_OUT / "imagenet_labels.txt"
GUEST = "edge_classify"
TARGET_OVER_MS = 1.0
ROUTE_ENV = {"MODEL": MODEL, "LABELS": "/data/imagenet_labels.txt"}
ROUTE_DIRS = [f"{EXAMPLE_OUT}:/data"]


@dataclass
class Step:
    name: str
    request_s: list[float]
    inference_s: list[float]
    parts: dict[str, list[float]]

    def p(self, q: float) -> float:
        return float(np.quantile(self.request_s, q))

    @property
    def over_s(self) -> float:
        """p50 request - p50 inference alone (timed separately, alternating)."""
        return statistics.median(self.request_s) - statistics.median(self.inference_s)

    @property
    def over_inside_s(self) -> float:
        """Median over requests of (request - the inference inside it): wasi-nn compute's
        time, which the route reports. Immune to the drift between separate runs."""
        return statistics.median(r - c for r, c in zip(self.request_s, self.parts["compute"]))


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.2f}"


# --- part 1 ----------------------------------------------------------------------------------


def request_of(body: bytes) -> WagiRequest:
    return WagiRequest(method="POST", path="/classify", body=body,
                       headers=[("content-type", "image/x-portable-pixmap")])


def check(response: WagiResponse, expected_class: int) -> None:
    if response.status != 200:
        raise SystemExit(f"the route answered {response.status}: {response.error} "
                         f"{response.body[:200]!r}")
    top = json.loads(response.body)["top5"][0]["class"]
    if top != expected_class:
        raise SystemExit(f"the route's top-1 is class {top}, onnxruntime's {expected_class}")


def measure_step(name: str, serve: Callable[[], WagiResponse], infer: Callable[[], object],
                 expected_class: int, requests: int, warmup: int,
                 settle: Callable[[], None] = lambda: None) -> Step:
    """`serve` answers one request (a WagiResponse); `infer` runs the inference alone;
    `settle` (untimed, after each request) waits for the route's work after its response
    (dropping the Store), so that it never runs inside the next timing."""
    for _ in range(warmup):
        check(serve(), expected_class)
        settle()
        infer()
    request_s: list[float] = []
    inference_s: list[float] = []
    parts: dict[str, list[float]] = {}
    for i in range(requests):
        for side in ((0, 1) if i % 2 == 0 else (1, 0)):  # alternate which goes first
            start = time.perf_counter()
            if side == 0:
                response = serve()
                request_s.append(time.perf_counter() - start)
                settle()
                check(response, expected_class)
                for part, seconds in response.timings.items():
                    parts.setdefault(part, []).append(seconds)
            else:
                infer()
                inference_s.append(time.perf_counter() - start)
    return Step(name, request_s, inference_s, parts)


def preinitialized_module(host: Host, wasm: Path, out: Path) -> Path:
    made = preinitialize(wasm.read_bytes(), host, engine="wasinn", env=ROUTE_ENV,
                         dirs=[Preopen.parse(d) for d in ROUTE_DIRS])
    out.write_bytes(made.wasm)
    return out


def latency_steps(args: argparse.Namespace, guest: Path, workdir: Path) -> list[Step]:
    body = IMAGE.read_bytes()
    # as `wasinn serve --route` makes it: pooled instance slots, onnxruntime's workers idle
    # (not spinning) between runs
    host = Host(models=[f"{MODEL}:onnx:cpu:{CLASSIFIER}"], module_cache=workdir / "modules",
                instance_pool=route_slots(ROUTE_WORKERS), backend_options=SERVER_BACKENDS)
    try:
        graph = host.registry.get(MODEL)
        assert isinstance(graph, OnnxGraph)
        session = graph.session
        feeds = {session.get_inputs()[0].name: classifier_input()}
        expected = int(np.argmax(session.run(None, feeds)[0]))

        def infer() -> object:
            return session.run(None, feeds)

        def route(module: Path, reuse_linking: bool = True, ahead: int = 0) -> WagiRoute:
            return WagiRoute(host, module, route="/classify", env=ROUTE_ENV, dirs=ROUTE_DIRS,
                             reuse_linking=reuse_linking, ahead=ahead)

        def fresh_route(cached: bool) -> Callable[[], WagiResponse]:
            def serve() -> WagiResponse:
                host.modules.enabled = cached
                try:  # the route compiles (or reads back) and links as it is made
                    r = route(guest, reuse_linking=False)
                finally:
                    host.modules.enabled = True
                try:
                    return r.handle(request_of(body))
                finally:
                    r.close()
            return serve

        preinit_wasm = preinitialized_module(host, guest, workdir / f"{GUEST}.preinit.wasm")
        host.compile(guest)  # fills the module cache for step 2
        linked_per_request = route(guest, reuse_linking=False)
        reused = route(guest)
        preinit = route(preinit_wasm)
        ahead = route(preinit_wasm, ahead=ROUTE_AHEAD)
        plan: list[tuple[str, Callable[[], WagiResponse], WagiRoute | None]] = [
            ("1 cold: compile + link", fresh_route(cached=False), None),
            ("2 module cache + link", fresh_route(cached=True), None),
            ("3 compiled once, link per request", lambda: linked_per_request.handle(
                request_of(body)), linked_per_request),
            ("4 linking reused (InstancePre)", lambda: reused.handle(request_of(body)), reused),
            ("5 pre-initialized + InstancePre", lambda: preinit.handle(request_of(body)),
             preinit),
            ("6 + instance made ahead", lambda: ahead.handle(request_of(body)), ahead),
        ]
        steps = []
        for name, serve, settles in plan:
            cold = settles is None
            steps.append(measure_step(name, serve, infer, expected,
                                      max(3, args.requests // 4) if cold else args.requests,
                                      1 if cold else args.warmup,
                                      settle=settles.settle if settles else lambda: None))
        for r in (linked_per_request, reused, preinit, ahead):
            r.close()
        return steps
    finally:
        host.close()


def report_latency(steps: Sequence[Step]) -> bool:
    rows = [("step", "requests", "p50 ms", "p90 ms", "inference ms", "over inference ms",
             "over its own ms", "setup ms", "instantiate ms", "run ms")]
    for s in steps:
        rows.append((s.name, str(len(s.request_s)), ms(s.p(0.5)), ms(s.p(0.9)),
                     ms(statistics.median(s.inference_s)), ms(s.over_s), ms(s.over_inside_s),
                     *(ms(statistics.median(s.parts.get(part, [0.0])))
                       for part in ("setup", "instantiate", "run"))))
    print_table(rows, left=1)
    print("  (inference: onnxruntime alone, timed between requests; over inference: p50 request"
          " - p50 inference; over its own: the median, over requests, of the request less the"
          " inference inside it (its wasi-nn compute); setup: Store, WASI config with the body"
          " as stdin and output files; run: the guest's _start, inference included; the cold"
          " steps' p50 include making the route)")
    warm = [s for s in steps if s.name.startswith(("4", "5", "6"))]
    best = min(warm, key=lambda s: s.over_inside_s)
    ok = best.over_inside_s <= TARGET_OVER_MS / 1e3
    print(f"target: a warm request <= {TARGET_OVER_MS:g} ms over the inference inside it: "
          f"{ms(best.over_inside_s)} ms ({best.name}; p50 request - p50 inference alone: "
          f"{ms(best.over_s)} ms) {'PASS' if ok else 'MISS'}")
    return ok


# --- part 2 ----------------------------------------------------------------------------------


@dataclass
class Level:
    clients: int
    seconds: float
    times: list[float]

    @property
    def per_s(self) -> float:
        return len(self.times) / self.seconds


async def run_level(port: int, clients: int, duration: float, body: bytes,
                    expected: int) -> Level:
    connections = [await HttpConnection.open("127.0.0.1", port) for _ in range(clients)]
    times: list[float] = []

    async def client(connection: HttpConnection, deadline: float) -> None:
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            status, _, answer = await connection.post("/classify", body,
                                                      "image/x-portable-pixmap")
            times.append(time.perf_counter() - start)
            if status != 200 or json.loads(answer)["top5"][0]["class"] != expected:
                raise SystemExit(f"the server answered {status}: {answer[:200]!r}")

    start = time.perf_counter()
    await asyncio.gather(*(client(c, start + duration) for c in connections))
    seconds = time.perf_counter() - start
    for connection in connections:
        await connection.close()
    return Level(clients, seconds, times)


async def throughput(args: argparse.Namespace, module: Path) -> list[Level]:
    body = IMAGE.read_bytes()
    workers = max(args.clients)
    server = Server(["--nn-preload", f"{MODEL}:onnx:cpu:{CLASSIFIER}",
                     "--route", f"/classify={module}", "--route-workers", str(workers),
                     "--route-env", f"MODEL={MODEL}", "--route-dir", ROUTE_DIRS[0],
                     "--no-cache"])
    try:
        connection = await HttpConnection.open("127.0.0.1", server.port)
        status, _, answer = await connection.post("/classify", body, "image/x-portable-pixmap")
        await connection.close()
        if status != 200:
            raise SystemExit(f"the server answered {status}: {answer[:300]!r}")
        expected = json.loads(answer)["top5"][0]["class"]
        await run_level(server.port, 1, min(1.0, args.duration), body, expected)  # warm-up
        return [await run_level(server.port, n, args.duration, body, expected)
                for n in args.clients]
    finally:
        server.stop()


def report_throughput(levels: Sequence[Level]) -> None:
    rows = [("clients", "requests", "requests/s", "p50 ms", "p90 ms")]
    for level in levels:
        rows.append((str(level.clients), str(len(level.times)), f"{level.per_s:,.1f}",
                     ms(float(np.quantile(level.times, 0.5))),
                     ms(float(np.quantile(level.times, 0.9)))))
    print_table(rows, left=1)


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60,
                        help="timed requests per warm step (cold steps: a quarter; default 60)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed requests per step")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")],
                        default=[1, 2, 4], help="concurrent HTTP clients, per level (1,2,4)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per throughput level (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: few requests, 1 s levels")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.warmup, args.duration = 8, 1, 1.0
    if args.requests < 1 or min(args.clients) < 1 or args.duration <= 0:
        parser.error("--requests, --clients and --duration must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    guest = build_guests([GUEST])[GUEST]
    prepare_classifier(LABELS)
    print(f"edge route {GUEST}.wasm on a {IMAGE.name} (224x224 PPM), {MODEL} on onnxruntime "
          f"(CPU); guests from {GUESTS_OUT}", flush=True)
    with tempfile.TemporaryDirectory(prefix="wasinn-edge-") as tmp:
        workdir = Path(tmp)
        print("\npart 1: per-request latency in process (WagiRoute.handle), medians", flush=True)
        steps = latency_steps(args, guest, workdir)
        ok = report_latency(steps)
        print(f"\npart 2: `wasinn serve --route` on loopback, pre-initialized guest, "
              f"{args.duration:g} s per level", flush=True)
        report_throughput(asyncio.run(throughput(args, workdir / f"{GUEST}.preinit.wasm")))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
