"""Property tests: random raw calls into `wasi_ephemeral_nn` through the real exerciser guest.

Properties, for every call with arbitrary handles, indices, pointers, lengths and tensor types:
- the host answers an int errno in 0..8 and nothing escapes (a Python exception in a host
  function would surface here as a wasmtime.Trap from the ex_* call);
- an errno other than 0 comes with `last_error` naming the function, success leaves it alone;
- afterwards the same instance still runs a known-good inference with exact results.

Why never 100..103: those errnos are WasmEdge's GGML extensions (end_of_sequence, context_full,
prompt_too_long, model_not_found) and only a streaming GGML backend raises them. This host serves
ONNX only: encoding 6 (ggml) is answered with invalid_encoding, the ONNX contexts raise
unsupported_operation for the single-step calls, and every other failure is an errno 1..8
(unexpected exceptions map to runtime_error 5).

Guest memory hygiene: the host really writes handles and outputs wherever a valid pointer says.
So that the fuzzer cannot corrupt the guest's own heap or stack (which would make the guest, not
the host, misbehave), every in-bounds pointer the fuzzer draws is redirected into a scratch block
it owns or into a page the host grew past the guest's heap; pointers at or past the end of memory
(the full u32 range above it, and values just below and above the end) are used as drawn.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from exerciser import (BUILDER, CURRENT, ENCODING_ONNX, FUNCTIONS, LEGACY, TARGET_CPU, TENSOR,
                       U32_MAX, Exerciser, add_inputs)
from wasinn.host import Host

ERRNOS = range(0, 9)
SCRATCH = 32 << 10
SLACK = 64  # an output (24 bytes at most) or a u32 written at a scratch pointer stays inside

#: models offered by name, each with its inputs' (type name, shape)
MODELS = {
    "add": [("f32", (2, 3)), ("f32", (2, 3))],
    "two_outputs": [("f32", (4,)), ("i64", (3,))],
    "identity_u8": [("u8", (2, 2))],
    "identity_f16": [("f16", (2, 2))],
    "identity_i64": [("i64", (2, 2))],
}
CONFIGS = [b"{}", b"", b"{", b"[]", b'{"n-predict": 3}', b"\xff"]
ITEMSIZE = {"f16": 2, "f32": 4, "f64": 8, "u8": 1, "i32": 4, "i64": 8}

u32s = st.integers(0, U32_MAX)


@dataclass
class Env:
    """One exerciser instance shared by all examples, and where things sit in its memory."""

    ex: Exerciser
    mem_size: int
    guard: int           # start of the page the host grew: [guard, mem_size) is fuzzer-owned
    scratch: int         # [scratch, scratch + SCRATCH) is fuzzer-owned, rewritten per example
    check: dict[str, int] = field(default_factory=dict)  # the known-good run's buffers
    model: bytes = b""
    # per example, inside scratch
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)
    bump: int = 0

    def reset_scratch(self) -> None:
        """Lay out the fuzzer's copies of names, configs and the model again, at fixed places."""
        ex, at = self.ex, self.scratch
        ex.write(at, b"\0" * SCRATCH)
        self.layout = {}

        def place(key: str, data: bytes) -> None:
            nonlocal at
            ex.write(at, data)
            self.layout[key] = (at, len(data))
            at += (len(data) + 8) & ~3

        place("model", self.model)
        place("builders", BUILDER.pack(self.layout["model"][0], len(self.model)))
        place("garbage", bytes(range(7, 71)))
        place("builders:garbage", BUILDER.pack(self.layout["garbage"][0], 64))
        place("builders:truncated", BUILDER.pack(self.layout["model"][0], len(self.model) // 2))
        for name in [*MODELS, "nope"]:
            place(f"name:{name}", name.encode())
        for i, config in enumerate(CONFIGS):
            place(f"config:{i}", config)
        self.bump = at

    def alloc(self, size: int) -> int:
        """Bump-allocate inside scratch (the example's own data, reset each example)."""
        ptr = self.bump
        self.bump += (size + 7) & ~3
        assert self.bump <= self.scratch + SCRATCH - SLACK, "scratch exhausted"
        return ptr

    def redirect(self, ptr: int) -> int:
        """An in-bounds pointer the fuzzer does not own goes into scratch instead."""
        if ptr >= self.guard or self.scratch <= ptr < self.scratch + SCRATCH - SLACK:
            return ptr
        return self.scratch + ptr % (SCRATCH - SLACK)


@pytest.fixture(scope="module")
def env(onnx_models, guests):
    host = Host(models=[f"{name}:onnx:cpu:{onnx_models[name]}" for name in MODELS],
                module_cache=False)
    ex = Exerciser(host, host.compile(guests["abi_exerciser"]))
    # the known-good run's buffers: never handed to the fuzzer
    x, y, _ = add_inputs()
    check = {
        "name": ex.put(b"add"),
        "x": ex.put_tensor([2, 3], CURRENT["f32"], x.tobytes()),
        "y": ex.put_tensor([2, 3], CURRENT["f32"], y.tobytes()),
        "out": ex.alloc(24),
        "slot": ex.alloc(4),
    }
    scratch = ex.alloc(SCRATCH)
    # a page past the guest's heap: in-bounds pointers near the end of memory land here
    guard = ex.memory.data_len(ex.store)
    ex.memory.grow(ex.store, 1)
    mem_size = ex.mem_size
    assert mem_size == guard + 65536
    e = Env(ex, mem_size, guard, scratch, check, onnx_models["add"].read_bytes())
    e.reset_scratch()
    yield e
    host.close()


# --- strategies --------------------------------------------------------------------------------

def pointers(env: Env) -> st.SearchStrategy[int]:
    known = st.sampled_from([ptr for ptr, _ in env.layout.values()])
    return st.one_of(
        known,
        st.integers(env.scratch, env.scratch + SCRATCH - SLACK - 1),
        st.integers(-48, 48).map(lambda d: (env.mem_size + d) & U32_MAX),   # around the end
        st.integers(U32_MAX - 64, U32_MAX),                                 # wraps around u32
        u32s.map(env.redirect),                                             # anywhere
    )


def lengths(env: Env) -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(0, 64),
        st.sampled_from([len(env.model), 20, 24, 4096, 4097, 1 << 20, (1 << 20) + 1,
                         env.mem_size, 1 << 31, U32_MAX]),
        u32s,
    )


def handles(live: list[int]) -> st.SearchStrategy[int]:
    """Often the last live handle (this example's setup made it), else any live one, a small
    one or any u32. The draws have the same shape whatever `live` holds (it carries over from earlier
    examples), as hypothesis needs."""
    return st.one_of(st.just(0).map(lambda _: live[-1] if live else 0),
                     st.integers(0, 63).map(lambda i: live[i % len(live)] if live else i),
                     st.integers(0, 8), u32s)


def indices() -> st.SearchStrategy[int]:
    return st.one_of(st.just(0), st.integers(0, 3), u32s)


def type_codes() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, 6), st.integers(0, 255))


@st.composite
def tensor_struct(draw, env: Env, plausible: bool) -> int:
    """A tensor struct in scratch; plausible ones point at dims and data that may well fit."""
    if plausible:
        model = draw(st.sampled_from(list(MODELS.values())))
        type_name, shape = draw(st.sampled_from(model))
        dims = draw(st.one_of(st.just(list(shape)),
                              st.lists(st.integers(0, 4), min_size=0, max_size=3)))
        code = draw(st.one_of(st.sampled_from([CURRENT[type_name], LEGACY.get(type_name, 0)]),
                              st.integers(0, 6)))
        itemsize = draw(st.one_of(st.just(ITEMSIZE[type_name]), st.sampled_from([1, 2, 4, 8])))
        count = int(np.prod(dims)) if dims else 1
        data_len = count * itemsize + draw(st.sampled_from([0, 0, 0, -1, 1, 4]))
        data_len = max(data_len, 0)
        data = draw(st.binary(min_size=data_len, max_size=data_len))
        dims_ptr = env.alloc(4 * len(dims))
        env.ex.write(dims_ptr, struct.pack(f"<{len(dims)}I", *dims))
        data_ptr = env.alloc(len(data))
        env.ex.write(data_ptr, data)
        dims_len = len(dims)
    else:
        dims_ptr = draw(pointers(env))
        dims_len = draw(st.one_of(st.integers(0, 40), u32s))
        code = draw(type_codes())
        data_ptr = draw(pointers(env))
        data_len = draw(lengths(env))
    padding = draw(st.binary(min_size=3, max_size=3))
    raw = bytearray(TENSOR.pack(dims_ptr, dims_len, code, data_ptr, data_len))
    raw[9:12] = padding
    ptr = env.alloc(TENSOR.size)
    env.ex.write(ptr, bytes(raw))
    return ptr


@st.composite
def calls(draw, env: Env, graphs: list[int], contexts: list[int]) -> tuple[str, tuple[int, ...]]:
    """One raw call: a function and its u32 arguments."""
    p, n = pointers(env), lengths(env)
    name = draw(st.sampled_from([*FUNCTIONS, "load_by_name", "set_input", "set_input",
                                 "compute", "get_output", "get_output"]))
    ctx, graph = handles(contexts), handles(graphs)
    if name == "load":
        builders = [v[0] for k, v in env.layout.items() if k.startswith("builders")]
        args = (draw(st.one_of(st.sampled_from(builders), p)),
                draw(st.one_of(st.just(1), st.integers(0, 3), st.integers(60, 70), u32s)),
                draw(st.one_of(st.just(ENCODING_ONNX), st.integers(0, 16), u32s)),
                draw(st.one_of(st.just(TARGET_CPU), st.integers(0, 5), u32s)),
                draw(p))
    elif name in ("load_by_name", "load_by_name_with_config"):
        names = [v for k, v in env.layout.items() if k.startswith("name:")]
        name_ptr, name_len = draw(st.one_of(st.sampled_from(names), st.tuples(p, n)))
        args = (name_ptr, name_len)
        if name == "load_by_name_with_config":
            configs = [v for k, v in env.layout.items() if k.startswith("config:")]
            args += draw(st.one_of(st.sampled_from(configs), st.tuples(p, n)))
        args += (draw(p),)
    elif name == "init_execution_context":
        args = (draw(graph), draw(p))
    elif name == "set_input":
        tensor = draw(st.one_of(tensor_struct(env, plausible=True),
                                tensor_struct(env, plausible=False), p))
        args = (draw(ctx), draw(indices()), tensor)
    elif name in ("get_output", "get_output_single"):
        args = (draw(ctx), draw(indices()), draw(p),
                draw(st.one_of(st.sampled_from([0, 4, 16, 23, 24, 32]), n)), draw(p))
    elif name == "unload":
        args = (draw(graph),)
    else:  # compute, compute_single, fini_single, finalize_execution_context
        args = (draw(ctx),)
    return name, args


# --- the known-good run and the properties -----------------------------------------------------

def known_good(env: Env) -> None:
    """load_by_name("add") + a full inference from the check buffers: exactly x + y."""
    ex, c = env.ex, env.check
    _, _, z = add_inputs()
    assert ex.raw("load_by_name", c["name"], 3, c["slot"]) == 0, ex.last_error
    graph = ex.read_u32(c["slot"])
    assert ex.raw("init_execution_context", graph, c["slot"]) == 0, ex.last_error
    ctx = ex.read_u32(c["slot"])
    assert ex.raw("set_input", ctx, 0, c["x"]) == 0, ex.last_error
    assert ex.raw("set_input", ctx, 1, c["y"]) == 0, ex.last_error
    assert ex.raw("compute", ctx) == 0, ex.last_error
    assert ex.raw("get_output", ctx, 0, c["out"], 24, c["slot"]) == 0, ex.last_error
    assert ex.read_u32(c["slot"]) == 24
    assert ex.read(c["out"], 24) == z.tobytes()
    assert ex.raw("finalize_execution_context", ctx) == 0, ex.last_error


def checked_call(env: Env, name: str, args: tuple[int, ...]) -> int:
    state = env.ex.state
    state.last_error = None
    errno = env.ex.raw(name, *args)  # a trap or exception would raise here
    assert type(errno) is int and errno in ERRNOS, (name, args, errno, state.last_error)
    event(f"{name} -> {errno}")  # pytest --hypothesis-show-statistics shows how deep it got
    if errno:
        assert state.last_error is not None and state.last_error.startswith(f"{name}: "), (
            name, args, errno, state.last_error)
        assert f"(errno {errno} " in state.last_error
    else:
        assert state.last_error is None, (name, args, state.last_error)
    return errno


def setup_handles(env: Env, draw) -> tuple[list[int], list[int]]:
    """Sometimes a live graph, a context, its inputs and a compute: deep paths become reachable."""
    ex, level = env.ex, draw(st.sampled_from([0, 1, 2, 3, 4, 4, 4]))
    graphs, contexts = list(env.ex.state.graphs), list(env.ex.state.contexts)
    if level == 0:
        return graphs, contexts
    model = draw(st.sampled_from(list(MODELS)))
    name_ptr, name_len = env.layout[f"name:{model}"]
    slot = env.alloc(4)
    assert checked_call(env, "load_by_name", (name_ptr, name_len, slot)) == 0
    graph = ex.read_u32(slot)
    graphs.append(graph)
    if level >= 2:
        assert checked_call(env, "init_execution_context", (graph, slot)) == 0
        ctx = ex.read_u32(slot)
        contexts.append(ctx)
        if level >= 3:
            for index, (type_name, shape) in enumerate(MODELS[model]):
                dtype = np.dtype({"f16": np.float16, "f32": np.float32, "u8": np.uint8,
                                  "i64": np.int64}[type_name])
                data = draw(st.binary(min_size=int(np.prod(shape)) * dtype.itemsize,
                                      max_size=int(np.prod(shape)) * dtype.itemsize))
                dims_ptr, data_ptr, tensor = env.alloc(4 * len(shape)), env.alloc(len(data)), \
                    env.alloc(TENSOR.size)
                ex.write(dims_ptr, struct.pack(f"<{len(shape)}I", *shape))
                ex.write(data_ptr, data)
                code = draw(st.sampled_from([CURRENT[type_name], LEGACY[type_name]]))
                ex.write(tensor, TENSOR.pack(dims_ptr, len(shape), code, data_ptr, len(data)))
                assert checked_call(env, "set_input", (ctx, index, tensor)) == 0
            if level >= 4:
                assert checked_call(env, "compute", (ctx,)) == 0
    return graphs, contexts


def trim(env: Env) -> None:
    """Keep the shared instance under the host's handle limits (it keeps state across examples)."""
    state = env.ex.state
    if len(state.contexts) > 256:
        for ctx in list(state.contexts):
            assert env.ex.raw("finalize_execution_context", ctx) == 0
    if len(state.graphs) > 64:
        for graph in list(state.graphs):
            assert env.ex.raw("unload", graph) == 0


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large])
@given(data=st.data())
def test_random_calls_answer_errno(env, data):
    env.reset_scratch()
    graphs, contexts = setup_handles(env, data.draw)
    for _ in range(data.draw(st.integers(1, 12), label="calls")):
        name, args = data.draw(calls(env, graphs, contexts), label="call")
        errno = checked_call(env, name, args)
        # a handle the host handed out becomes a likely target for the following calls
        if errno == 0 and name in ("load", "load_by_name", "load_by_name_with_config",
                                   "init_execution_context"):
            out = args[-1]
            if out + 4 <= env.mem_size:
                # (at the front: the setup's handles stay last, the "newest" in `handles`)
                (graphs if name != "init_execution_context" else contexts).insert(
                    0, env.ex.read_u32(out))
    assert env.ex.mem_size == env.mem_size  # the host never grows guest memory
    known_good(env)
    trim(env)


# --- a sequence property: the host's answers follow a simple model of handles -----------------

OPS = st.sampled_from(["load_by_name", "load", "init", "set_input", "set_bad_input", "compute",
                       "get_output", "get_output_small", "finalize", "unload", "single"])


@pytest.fixture(scope="module")
def fresh(onnx_models, guests):
    """A factory of fresh exerciser instances (one compiled module, one host)."""
    host = Host(models=[f"add:onnx:cpu:{onnx_models['add']}"], module_cache=False)
    module = host.compile(guests["abi_exerciser"])
    yield lambda: Exerciser(host, module)
    host.close()


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=False)
add_arrays = st.lists(finite_f32, min_size=6, max_size=6).map(
    lambda v: np.array(v, dtype=np.float32).reshape(2, 3))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(OPS, st.integers(0, 7), add_arrays), min_size=1, max_size=25))
def test_sequences_follow_handle_model(fresh, onnx_models, ops):
    """Random valid and invalid steps on `add`; each errno and each output is predicted.

    The model: graph and context handles count from 0 and are never reused; load_by_name of a
    live name returns its handle; unload kills a graph (contexts made from it keep working, as
    here they hold their own reference); compute needs both inputs; get_output needs a compute
    and returns x + y of the inputs at that compute; a short buffer gets too_large with the size.
    """
    ex = fresh()
    model = onnx_models["add"].read_bytes()
    graphs: set[int] = set()
    named: int | None = None
    next_graph = next_ctx = 0
    ctxs: dict[int, dict] = {}  # handle -> {"inputs": {index: array}, "out": bytes | None}

    def pick(pool, i):
        pool = sorted(pool)
        return pool[i % len(pool)] if pool and i < 6 else 1000 + i  # sometimes a dead handle

    for op, i, array in ops:
        if op == "load_by_name":
            errno, handle = ex.load_by_name("add")
            if named is None:
                named, next_graph = next_graph, next_graph + 1
                graphs.add(named)
            assert (errno, handle) == (0, named)
        elif op == "load":
            assert ex.load(model) == (0, next_graph)
            graphs.add(next_graph)
            next_graph += 1
        elif op == "init":
            graph = pick(graphs, i)
            errno, ctx = ex.init(graph)
            if graph in graphs:
                assert (errno, ctx) == (0, next_ctx)
                ctxs[next_ctx] = {"inputs": {}, "out": None}
                next_ctx += 1
            else:
                assert errno == 1
        elif op in ("set_input", "set_bad_input"):
            ctx, index = pick(ctxs, i), i % 2
            if op == "set_input":
                errno = ex.set_input(ctx, index, CURRENT["f32"], array)
                ok = ctx in ctxs
            else:  # right type, wrong length
                errno = ex.set_input(ctx, index, CURRENT["f32"], array, data_len=20)
                ok = False
            assert errno == (0 if ok else 1), ex.last_error
            if ok:
                ctxs[ctx]["inputs"][index] = array.copy()
        elif op == "compute":
            ctx = pick(ctxs, i)
            ok = ctx in ctxs and len(ctxs[ctx]["inputs"]) == 2
            assert ex.raw("compute", ctx) == (0 if ok else 1), ex.last_error
            if ok:
                x, y = ctxs[ctx]["inputs"][0], ctxs[ctx]["inputs"][1]
                ctxs[ctx]["out"] = (x + y).tobytes()
        elif op in ("get_output", "get_output_small"):
            ctx = pick(ctxs, i)
            expected = ctxs[ctx]["out"] if ctx in ctxs else None
            size = 24 if op == "get_output" else i % 24
            errno, data, written = ex.get_output(ctx, 0, size)
            if expected is None:
                assert errno == 1
            elif op == "get_output":
                assert (errno, data, written) == (0, expected, 24)
            else:
                assert (errno, written) == (7, 24)
        elif op == "finalize":
            ctx = pick(ctxs, i)
            assert ex.raw("finalize_execution_context", ctx) == (0 if ctx in ctxs else 1)
            ctxs.pop(ctx, None)
        elif op == "unload":
            graph = pick(graphs, i)
            assert ex.raw("unload", graph) == (0 if graph in graphs else 1)
            graphs.discard(graph)
            if graph == named:
                named = None
        elif op == "single":
            ctx = pick(ctxs, i)
            assert ex.raw("compute_single", ctx) == (6 if ctx in ctxs else 1)
        ex.free_all()
    # whatever happened, a known-good run on the same instance
    errno, graph = ex.load_by_name("add")
    assert errno == 0
    x, y, z = add_inputs()
    (out,) = ex.infer(graph, [(CURRENT["f32"], x), (CURRENT["f32"], y)], [24])
    assert out == z.tobytes()
