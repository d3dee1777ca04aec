"""What running the classifier through a wasm guest costs over calling each framework directly.

    python bench/backends.py [--rounds N] [--iters N] [--warmup N] [--threads N] [--quick]

One model, EfficientNet-Lite0 (f32 [1,3,224,224] -> [1,1000]), in each backend's format:

* onnx:            model.onnx (examples/classify/prepare.py) on onnxruntime;
* openvino (ONNX): the same model.onnx read by OpenVINO;
* openvino (IR):   its IR pair, made from model.onnx with openvino.convert_model;
* pytorch:         model.pt, the TorchScript trace prepare.py makes;
* tensorflowlite:  model.tflite, made by examples/classify/to_tflite.py, on LiteRT.

For each, the same work per inference is timed on two sides, as bench/overhead.py does it:

* direct: the framework called from Python on the very object the guest's context computes
  on: the graph's onnxruntime session, its OpenVINO compiled model (with an infer request of
  its own: a request is only the buffers), its TorchScript module, the LiteRT interpreter of
  the guest's own context (LiteRT contexts do not share one);
* guest: one call of guests/bench.c's ``bench_run(n, ...)``: n x (set_input(0) + compute +
  get_output(0)) inside wasm; time / n per inference.

After warm-up rounds the sides alternate (A B, B A, ...); reported are the medians per
inference, ratio = guest / direct, and the fixed cost guest - direct. `--threads` (default 2)
goes to every backend through the Host (onnxruntime's intra-op threads, OpenVINO's
INFERENCE_NUM_THREADS, LiteRT's num_threads), so both sides of a row share it. The pytorch
backend applies none (torch's only setting is process-wide), so this program, as the embedding
program, calls torch.set_num_threads with it: again the same for both sides.

A backend whose framework is not installed is skipped with the reason. Set-up (skipped when up
to date): the bench guest into build/guests, the models into build/example and build/bench.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import wasmtime

from _common import (CLASSIFIER, CLASSIFIER_DIR, MODELS_OUT, GuestRunner, Result, Side,
                     build_bench_guest, classifier_input, describe, measure, prepare_classifier,
                     print_table, run_example_script, timed_loop, us)
from wasinn.host import Host
from wasinn.registry import ModelSpec
from wasinn.tensor import ExecutionTarget, GraphEncoding

TORCHSCRIPT = CLASSIFIER_DIR / "model.pt"
TFLITE = CLASSIFIER_DIR / "model.tflite"
IR_DIR = MODELS_OUT / "efficientnet-lite0-ir"

#: the guest's output against the direct side's, on the same framework object
RTOL, ATOL = 1e-5, 1e-5


# --- set-up ----------------------------------------------------------------------------------


def onnx_files() -> tuple[Path, ...]:
    prepare_classifier()
    return (CLASSIFIER,)


def ir_files() -> tuple[Path, ...]:
    """OpenVINO's own converter, as tests/test_openvino_backend.py's to_ir: f32 weights."""
    xml, weights = IR_DIR / "model.xml", IR_DIR / "model.bin"
    if not (xml.exists() and weights.exists()):
        import openvino as ov

        prepare_classifier()
        IR_DIR.mkdir(parents=True, exist_ok=True)
        ov.save_model(ov.convert_model(str(CLASSIFIER)), str(xml), compress_to_fp16=False)
    return xml, weights


def torchscript_files() -> tuple[Path, ...]:
    prepare_classifier(TORCHSCRIPT)
    return (TORCHSCRIPT,)


def tflite_files() -> tuple[Path, ...]:
    prepare_classifier()
    run_example_script("to_tflite.py", TFLITE)
    return (TFLITE,)


# --- the direct sides ------------------------------------------------------------------------


#: (the host's graph, the guest's execution context, the input) -> one direct inference
#: answering the output, and what framework object it runs on
DirectCall = Callable[[Any, Any, np.ndarray], tuple[Callable[[], np.ndarray], str]]


def onnx_direct(graph: Any, context: Any, array: np.ndarray) -> tuple[Callable[[], np.ndarray], str]:
    session = graph.session  # the host's own session: same options, same thread pool
    feeds = {session.get_inputs()[0].name: array}
    session_run = session.run
    return lambda: session_run(None, feeds)[0], "the graph's InferenceSession.run"


def openvino_direct(graph: Any, context: Any,
                    array: np.ndarray) -> tuple[Callable[[], np.ndarray], str]:
    # the compiled model holds the CPU streams and threads; a request is its buffers
    request = graph.compiled.create_infer_request()
    feeds = {0: array}
    return (lambda: request.infer(feeds).to_tuple()[0],
            "the graph's CompiledModel, InferRequest.infer")


def pytorch_direct(graph: Any, context: Any,
                   array: np.ndarray) -> tuple[Callable[[], np.ndarray], str]:
    import torch

    module, x = graph.module, torch.from_numpy(array)

    def infer() -> np.ndarray:
        with torch.inference_mode():  # as the backend's compute does, per call
            return module(x).numpy()

    return infer, "the graph's ScriptModule"


def litert_direct(graph: Any, context: Any,
                  array: np.ndarray) -> tuple[Callable[[], np.ndarray], str]:
    # each LiteRT context builds its own Interpreter: take the guest's (private to the backend)
    interpreter = context._interpreter
    input_index = graph.inputs[0]["index"]
    output_index = graph.outputs[0]["index"]

    def infer() -> np.ndarray:
        interpreter.set_tensor(input_index, array)
        interpreter.invoke()
        return interpreter.get_tensor(output_index)

    return infer, "the guest context's Interpreter"


@dataclass(frozen=True)
class Case:
    label: str  # the row, and the model's name in the Host
    encoding: GraphEncoding
    framework: str  # the module to import, and the distribution whose version is printed
    distribution: str
    extra: str
    files: Callable[[], tuple[Path, ...]]
    direct: DirectCall


CASES = (
    Case("onnx", GraphEncoding.ONNX, "onnxruntime", "onnxruntime", "onnx", onnx_files,
         onnx_direct),
    Case("openvino-onnx", GraphEncoding.OPENVINO, "openvino", "openvino", "openvino",
         onnx_files, openvino_direct),
    Case("openvino-ir", GraphEncoding.OPENVINO, "openvino", "openvino", "openvino", ir_files,
         openvino_direct),
    Case("pytorch", GraphEncoding.PYTORCH, "torch", "torch", "pytorch", torchscript_files,
         pytorch_direct),
    Case("tensorflowlite", GraphEncoding.TENSORFLOWLITE, "ai_edge_litert", "ai-edge-litert",
         "litert", tflite_files, litert_direct),
)


def bench_case(host: Host, module: wasmtime.Module, case: Case, array: np.ndarray, iters: int,
               rounds: int, warmup: int) -> tuple[Result, str]:
    graph = host.registry.get(case.label)
    probe = np.empty((1, 1000), np.float32)
    guest = GuestRunner(host, module, case.label, array, probe.nbytes)
    guest(1)  # the context exists and has run once: LiteRT's interpreter is allocated
    ((context, _),) = guest.state.contexts.values()
    infer, what = case.direct(graph, context, array)
    expected = np.ascontiguousarray(infer())
    if expected.shape != probe.shape or expected.dtype != probe.dtype:
        raise SystemExit(f"{case.label}: expected f32 [1,1000] logits, got {expected.dtype} "
                         f"{list(expected.shape)}")
    got = np.frombuffer(guest.output(), dtype=expected.dtype).reshape(expected.shape)
    if not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise SystemExit(f"{case.label}: the guest's output differs from the direct call's by "
                         f"{np.abs(got - expected).max():.2e}")
    direct: Side = timed_loop(infer)
    return measure(case.label, describe(array), direct, guest, iters, rounds, warmup), what


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=31,
                        help="timed rounds per backend, guest and direct alternating (default 31)")
    parser.add_argument("--iters", type=int, default=10,
                        help="inferences per round (default 10)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed rounds per side before timing (default 3)")
    parser.add_argument("--threads", type=int, default=2,
                        help="threads for every framework, both sides (default 2)")
    parser.add_argument("--only", default=None,
                        help="comma-separated rows to run, e.g. onnx,pytorch (default: all)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: 5 rounds of 2 inferences, 1 warm-up round")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.iters, args.warmup = 5, 2, 1
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--rounds, --iters and --threads must be at least 1, --warmup >= 0")
    labels = [case.label for case in CASES]
    args.only = labels if args.only is None else args.only.split(",")
    unknown = sorted(set(args.only) - set(labels))
    if unknown:
        parser.error(f"--only: unknown {', '.join(unknown)} (known: {', '.join(labels)})")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [case for case in CASES if case.label in args.only]
    ready: list[tuple[Case, tuple[Path, ...]]] = []
    skipped: list[str] = []
    for case in chosen:
        if importlib.util.find_spec(case.framework) is None:
            skipped.append(f"{case.label}: {case.framework} is not installed "
                           f"(pip install 'wasinn[{case.extra}]')")
        else:
            ready.append((case, case.files()))
    if any(case.framework == "torch" for case, _ in ready):
        import torch

        torch.set_num_threads(args.threads)  # process-wide: the backend sets none

    guest_wasm = build_bench_guest()
    specs = [ModelSpec(case.label, case.encoding, ExecutionTarget.CPU, paths)
             for case, paths in ready]
    host = Host(models=specs, threads=args.threads, module_cache=False)
    results: list[tuple[Case, Path, Result, str]] = []
    try:
        module = host.compile(guest_wasm)
        array = classifier_input()
        for case, paths in ready:
            result, what = bench_case(host, module, case, array, args.iters, args.rounds,
                                      args.warmup)
            results.append((case, paths[0], result, what))
    finally:
        host.close()
    report(results, skipped, args)
    return 0


def report(results: list[tuple[Case, Path, Result, str]], skipped: list[str],
           args: argparse.Namespace) -> None:
    print(f"wasinn guest vs each framework called directly, EfficientNet-Lite0 f32[1,3,224,224] "
          f"(CPU, threads: {args.threads}, {os.cpu_count()} CPUs): {args.rounds} rounds of "
          f"{args.iters}, {args.warmup} warm-up")
    rows = [("backend", "model", "direct us", "guest us", "ratio", "fixed us", "+/- us")]
    for _, path, r, _ in results:
        rows.append((r.model, path.name, us(r.direct_s), us(r.guest_s), f"{r.ratio:.3f}",
                     f"{r.fixed_us:,.1f}", f"{r.noise_us:,.1f}"))
    print_table(rows, left=2)
    print("  (medians per inference over rounds; +/- is half the IQR of guest - direct per "
          "round)")
    versions = {case.distribution: importlib.metadata.version(case.distribution)
                for case, *_ in results}
    print("direct sides:")
    for _, _, r, what in results:
        print(f"  {r.model}: {what}")
    print("frameworks: " + ", ".join(f"{name} {v}" for name, v in versions.items()))
    if any(case.framework == "torch" for case, *_ in results):
        import torch

        print(f"torch threads: {torch.get_num_threads()} (torch.set_num_threads, process-wide)")
    for line in skipped:
        print(f"skipped {line}")


if __name__ == "__main__":
    raise SystemExit(main())
