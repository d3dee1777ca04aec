"""The native repeat path (wasinn._native): a guest's repeated set_input / get_output served in
C must answer exactly what the Python handlers answer, and fall back to them for anything new.

Every call goes through the real exerciser guest; `stats()` tells which side served it.
"""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest
import wasmtime

from exerciser import CURRENT, Exerciser, add_inputs
from wasinn._native import FastPath
from wasinn.errors import Errno
from wasinn.host import Host

F32 = CURRENT["f32"]
SUCCESS = Errno.SUCCESS

pytestmark = pytest.mark.skipif(FastPath.create() is None,
                                reason="the native fast path could not be built (no ziglang?)")


@pytest.fixture(scope="module")
def host(onnx_models):
    h = Host(models=[f"{name}:onnx:cpu:{path}" for name, path in onnx_models.items()],
             module_cache=False)
    yield h
    h.close()


@pytest.fixture(scope="module")
def module(host, guests):
    return host.compile(guests["abi_exerciser"])


@pytest.fixture
def ex(host, module):
    return Exerciser(host, module)


def fast(host: Host) -> FastPath:
    host.linker(wasi=False)  # the fast path starts with the first Linker
    assert host._abi.fast is not None
    return host._abi.fast


def add_context(ex: Exerciser) -> int:
    errno, graph = ex.load_by_name("add")
    assert errno == SUCCESS, ex.last_error
    errno, ctx = ex.init(graph)
    assert errno == SUCCESS, ex.last_error
    return ctx


def add_round(ex: Exerciser, ctx: int, x: np.ndarray, y: np.ndarray, **kw) -> np.ndarray:
    assert ex.set_input(ctx, 0, F32, x, **kw) == SUCCESS, ex.last_error
    assert ex.set_input(ctx, 1, F32, y, **kw) == SUCCESS, ex.last_error
    assert ex.raw("compute", ctx) == SUCCESS, ex.last_error
    errno, data, written = ex.get_output(ctx, 0, x.nbytes)
    assert errno == SUCCESS, ex.last_error
    assert written == x.nbytes
    return np.frombuffer(data, np.float32).reshape(x.shape)


def test_a_loop_is_served_in_c_with_exact_values(host, ex):
    ctx = add_context(ex)
    x, y, z = add_inputs()
    hits, misses, _ = fast(host).stats()
    assert np.array_equal(add_round(ex, ctx, x, y), z)  # first round: Python, which registers
    after_first = fast(host).stats()
    assert after_first[1] - misses == 2  # set_input x2
    # the output array is rewritten in place, so compute registered it: the first get_output
    # (all a fresh store, a route's request, ever makes) is served in C already
    assert after_first[0] - hits == 1
    rng = np.random.default_rng(0)
    for _ in range(20):  # new values, same shapes, new guest addresses every time
        a, b = (rng.standard_normal((2, 3), dtype=np.float32) for _ in range(2))
        assert np.array_equal(add_round(ex, ctx, a, b), a + b)
    hits_now, misses_now, _ = fast(host).stats()
    assert hits_now - after_first[0] == 20 * 3  # every later set_input and get_output in C
    assert misses_now == after_first[1]


def test_python_and_c_answer_the_same_bytes(onnx_models, guests):
    x, y, z = add_inputs()
    answers = []
    for native in (False, True):
        h = Host(models=[f"add:onnx:cpu:{onnx_models['add']}"], module_cache=False,
                 native=native)
        try:
            e = Exerciser(h, h.compile(guests["abi_exerciser"]))
            assert (h._abi.fast is not None) is native
            ctx = add_context(e)
            answers.append([add_round(e, ctx, x * k, y).tobytes() for k in range(1, 4)])
        finally:
            h.close()
    assert answers[0] == answers[1] == [(x * k + y).tobytes() for k in range(1, 4)]


def test_anything_new_goes_back_to_python(host, ex):
    ctx = add_context(ex)
    x, y, z = add_inputs()
    add_round(ex, ctx, x, y)
    # other dims than registered: Python answers, with its errno and message
    assert ex.set_input(ctx, 0, F32, x.reshape(3, 2)) == Errno.INVALID_ARGUMENT
    assert "dims" in ex.last_error
    # the failed call dropped the registration; the next good round registers again
    assert np.array_equal(add_round(ex, ctx, x, y), z)
    # a data range outside memory: Python's invalid_argument, never a copy in C
    assert ex.set_input(ctx, 0, F32, x, data_len=ex.mem_size) != SUCCESS
    # an output buffer too small: too_large, with the size needed written
    errno, _, written = ex.get_output(ctx, 0, z.nbytes - 1)
    assert (errno, written) == (Errno.TOO_LARGE, z.nbytes)
    # an unknown context never reaches a registration
    assert ex.set_input(ctx + 100, 0, F32, x) == Errno.INVALID_ARGUMENT


def test_outputs_armed_at_set_input_wait_for_compute(host, module):
    """A context's outputs are pinned at its first set_input (before any compute), in arrays
    another store's context computed into: C serves them only once this context has computed,
    never before, nor after a compute that failed."""
    x, y, z = add_inputs()
    first = Exerciser(host, module)
    assert np.array_equal(add_round(first, add_context(first), x, y), z)
    e = Exerciser(host, module)
    ctx = add_context(e)
    registered = fast(host).stats()[2]
    assert e.set_input(ctx, 0, F32, x) == SUCCESS
    before = fast(host).stats()
    assert before[2] == registered + 2  # the input, and the output armed
    errno, _, _ = e.get_output(ctx, 0, z.nbytes)  # not computed: Python's error, not z
    assert errno != SUCCESS
    assert fast(host).stats()[1] == before[1] + 1
    assert e.raw("compute", ctx) != SUCCESS  # input 1 missing: the compute fails
    errno, _, _ = e.get_output(ctx, 0, z.nbytes)
    assert errno != SUCCESS
    assert np.array_equal(add_round(e, ctx, x, y), z)
    hits = fast(host).stats()[0]
    errno, data, _ = e.get_output(ctx, 0, z.nbytes)  # served in C now
    assert errno == SUCCESS and np.frombuffer(data, np.float32).tobytes() == z.tobytes()
    assert fast(host).stats()[0] == hits + 1


def test_input_is_copied_at_set_input_not_at_compute(host, ex):
    """A guest that reuses its buffer after set_input must not change what compute sees."""
    ctx = add_context(ex)
    x, y, z = add_inputs()
    add_round(ex, ctx, x, y)  # registered: the next set_input is served in C
    tensor = ex.put_tensor(x.shape, F32, x.tobytes())
    assert ex.raw("set_input", ctx, 0, tensor) == SUCCESS
    data_ptr = int.from_bytes(ex.read(tensor + 12, 4), "little")
    ex.write(data_ptr, np.full_like(x, 99.0).tobytes())  # after set_input: must not count
    assert ex.set_input(ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", ctx) == SUCCESS
    errno, data, _ = ex.get_output(ctx, 0, z.nbytes)
    assert errno == SUCCESS and np.frombuffer(data, np.float32).tobytes() == z.tobytes()


def test_registrations_go_with_their_context_and_store(host, module):
    before = fast(host).stats()[2]
    e = Exerciser(host, module)
    ctx = add_context(e)
    x, y, _ = add_inputs()
    add_round(e, ctx, x, y)
    assert fast(host).stats()[2] == before + 3
    assert e.raw("finalize_execution_context", ctx) == SUCCESS
    assert fast(host).stats()[2] == before
    # the finalized handle is unknown again, in C as in Python
    assert e.set_input(ctx, 0, F32, x) == Errno.INVALID_ARGUMENT
    ctx = add_context(e)
    add_round(e, ctx, x, y)
    assert fast(host).stats()[2] == before + 3
    del e  # the Store goes, and with it every registration it had
    gc.collect()
    assert fast(host).stats()[2] == before


def test_stores_on_threads_do_not_mix(host, module):
    """Each thread's guest sets its own values in a loop: never another's."""
    errors: list[str] = []

    def worker(k: int) -> None:
        e = Exerciser(host, module)
        ctx = add_context(e)
        x, y, _ = add_inputs()
        for i in range(50):
            got = add_round(e, ctx, x + k, y * i)
            if not np.array_equal(got, (x + k) + (y * i)):
                errors.append(f"thread {k} round {i}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_off_by_choice(onnx_models, monkeypatch):
    host = Host(native=False)
    host.linker(wasi=False)
    assert host._abi.fast is None
    monkeypatch.setenv("WASINN_NATIVE", "0")
    assert FastPath.create() is None


def test_unregistered_store_never_served(host, module):
    """A Store not given to the host: C finds no registration, Python answers the errno."""
    e = Exerciser(host, module, register=False)
    errno = e.raw("set_input", 0, 0, e.put_tensor([2, 3], F32, bytes(24)))
    assert errno == Errno.RUNTIME_ERROR  # "this Store was not given to Host.add_to_store"
    assert isinstance(e.store, wasmtime.Store)


def test_a_refused_tensor_leaves_the_input_set_before(host, ex):
    """Same byte length, other dims: the backend refuses it, and what compute reads is still
    the input registered before (C never copies a call that was not accepted as it is)."""
    ctx = add_context(ex)
    x, y, z = add_inputs()
    add_round(ex, ctx, x, y)
    assert ex.set_input(ctx, 0, F32, np.full((3, 2), 7.0, np.float32)) == Errno.INVALID_ARGUMENT
    assert ex.set_input(ctx, 0, F32, np.full((3, 2), 7.0, np.float32),
                        dims=(3, 2)) == Errno.INVALID_ARGUMENT  # again: still refused
    assert ex.raw("compute", ctx) == SUCCESS
    errno, data, _ = ex.get_output(ctx, 0, z.nbytes)
    assert errno == SUCCESS and data == z.tobytes()
    assert np.array_equal(add_round(ex, ctx, x * 2, y), x * 2 + y)  # and the loop goes on


def test_a_registration_of_another_store_is_never_used(host, ex):
    """Registrations are checked against wasmtime's id of the calling store: a new store at
    the address of a dropped one (before its registrations were dropped) is not served by
    them. Simulated: this store's registration rewritten with another store's id."""
    ctx = add_context(ex)
    x, y, z = add_inputs()
    add_round(ex, ctx, x, y)
    state = ex.state
    assert state is not None and state.store_id
    decoy = np.zeros(6, np.float32)
    fast(host).put_input(state.store_key, state.store_id + 1, ctx, 0, x.shape, F32, x.nbytes,
                         decoy.ctypes.data)
    _, misses, _ = fast(host).stats()
    assert ex.set_input(ctx, 0, F32, x * 3) == SUCCESS
    assert fast(host).stats()[1] == misses + 1  # Python served it
    assert not decoy.any()  # and C never wrote the decoy
    assert ex.set_input(ctx, 1, F32, y) == SUCCESS
    assert ex.raw("compute", ctx) == SUCCESS
    errno, data, _ = ex.get_output(ctx, 0, z.nbytes)
    assert errno == SUCCESS and data == (x * 3 + y).tobytes()


@pytest.mark.parametrize("native", [True, False])
def test_deadlines_tick_in_c_or_python(guests, native):
    """A guest past its deadline is stopped whichever thread advances the epoch: the one in C
    (with the native path), or Python's; and the same host runs the next guest as usual."""
    from wasinn.server import WagiRequest, WagiRoute

    host = Host(module_cache=False, native=native)
    route = WagiRoute(host, guests["edge_test"], route="/test", timeout=0.2)
    try:
        assert (host._ticker._native is not None) is native
        for _ in range(2):
            assert route.handle(WagiRequest(path="/test/loop")).status == 504
            assert route.handle(WagiRequest(path="/test/echo")).status == 200
    finally:
        route.close()
        host.close()
    assert host._ticker._native is None  # closed with the host


# --- contexts kept ready between stores ------------------------------------------------------

@pytest.fixture
def own_host(onnx_models):
    """A host of its own: its pool of ready contexts starts empty."""
    h = Host(models=[f"{name}:onnx:cpu:{path}" for name, path in onnx_models.items()],
             module_cache=False)
    yield h
    h.close()


def finished(host: Host, module: wasmtime.Module, x: np.ndarray, y: np.ndarray) -> None:
    """A store that computes x + y once and goes: its context is kept ready."""
    e = Exerciser(host, module)
    assert np.array_equal(add_round(e, add_context(e), x, y), x + y)
    del e
    gc.collect()


def after_a_store(host: Host, guests) -> tuple[Exerciser, int]:
    """A store whose context of `add` is claimed in C, from one that computed x + y."""
    module = host.compile(guests["abi_exerciser"])
    x, y, _ = add_inputs()
    finished(host, module, x, y)
    e = Exerciser(host, module)
    hits = fast(host).stats()[0]
    ctx = add_context(e)
    assert fast(host).stats()[0] == hits + 1  # claimed in C
    return e, ctx


def test_a_later_store_takes_the_ready_context_in_c(own_host, guests):
    module = own_host.compile(guests["abi_exerciser"])
    x, y, _ = add_inputs()
    finished(own_host, module, x, y)
    e = Exerciser(own_host, module)
    errno, graph = e.load_by_name("add")
    assert errno == SUCCESS
    hits, misses, _ = fast(own_host).stats()
    errno, ctx = e.init(graph)
    assert (errno, ctx) == (SUCCESS, 0)
    assert e.set_input(ctx, 0, F32, x * 2) == SUCCESS
    assert e.set_input(ctx, 1, F32, y) == SUCCESS
    assert fast(own_host).stats()[:2] == (hits + 3, misses)  # init and both inputs in C
    assert e.raw("compute", ctx) == SUCCESS
    errno, data, _ = e.get_output(ctx, 0, x.nbytes)
    assert errno == SUCCESS and data == (x * 2 + y).tobytes()
    assert fast(own_host).stats()[:2] == (hits + 4, misses)  # and get_output
    # a second context of the same store is Python's, with the next handle
    errno, second = e.init(graph)
    assert (errno, second) == (SUCCESS, 1)
    assert np.array_equal(add_round(e, second, x, y * 3), x + y * 3)
    assert np.array_equal(add_round(e, ctx, x, y), x + y)  # the first still answers


def test_a_ready_context_shows_nothing_of_the_store_before(own_host, guests):
    """Claimed in C, the context answers as a new one: no output before it computes, no
    compute before every input is set, whatever the last store left in its arrays."""
    e, ctx = after_a_store(own_host, guests)
    x, y, z = add_inputs()
    errno, _, _ = e.get_output(ctx, 0, z.nbytes)
    assert errno != SUCCESS
    assert e.raw("compute", ctx) == Errno.INVALID_ARGUMENT
    assert "before every input is set" in e.last_error
    assert np.array_equal(add_round(e, ctx, x * 5, y), x * 5 + y)


def test_a_ready_context_with_its_inputs_set_has_no_output_yet(own_host, guests):
    e, ctx = after_a_store(own_host, guests)
    x, y, z = add_inputs()
    assert e.set_input(ctx, 0, F32, x) == SUCCESS
    assert e.set_input(ctx, 1, F32, y) == SUCCESS  # both in C: the context is taken as it is
    errno, _, _ = e.get_output(ctx, 0, z.nbytes)
    assert errno != SUCCESS  # the last store's z, identical, must not be served yet
    assert e.raw("compute", ctx) == SUCCESS
    errno, data, _ = e.get_output(ctx, 0, z.nbytes)
    assert errno == SUCCESS and data == z.tobytes()


def test_a_ready_context_with_one_input_set(own_host, guests):
    """Only the inputs this guest set count: the other one is missing, not the last store's."""
    e, ctx = after_a_store(own_host, guests)
    x, y, _ = add_inputs()
    assert e.set_input(ctx, 0, F32, x * 7) == SUCCESS  # served in C
    assert e.raw("compute", ctx) == Errno.INVALID_ARGUMENT
    assert "missing" in e.last_error
    assert e.set_input(ctx, 1, F32, y) == SUCCESS
    assert e.raw("compute", ctx) == SUCCESS
    errno, data, _ = e.get_output(ctx, 0, x.nbytes)
    assert errno == SUCCESS and data == (x * 7 + y).tobytes()  # input 0 as set in C


def test_a_ready_context_refusing_a_new_shape(own_host, guests):
    e, ctx = after_a_store(own_host, guests)
    x, y, _ = add_inputs()
    assert e.set_input(ctx, 0, F32, x.reshape(3, 2)) == Errno.INVALID_ARGUMENT
    assert "dims" in e.last_error
    assert np.array_equal(add_round(e, ctx, x, y * 2), x + y * 2)


def test_an_unclaimed_ready_context_goes_back(own_host, guests):
    """A store that loads the graph but makes no context of it (or of another graph first)
    leaves the ready context for the next store."""
    module = own_host.compile(guests["abi_exerciser"])
    x, y, _ = add_inputs()
    finished(own_host, module, x, y)
    e = Exerciser(own_host, module)
    assert e.load_by_name("add")[0] == SUCCESS
    errno, other = e.load_by_name("two_outputs")
    assert errno == SUCCESS
    errno, ctx = e.init(other)  # not the reserved graph: Python, handle 0
    assert (errno, ctx) == (SUCCESS, 0)
    del e
    gc.collect()
    e = Exerciser(own_host, module)
    errno, graph = e.load_by_name("add")
    hits = fast(own_host).stats()[0]
    assert e.init(graph) == (SUCCESS, 0)
    assert fast(own_host).stats()[0] == hits + 1  # claimed in C
    assert np.array_equal(add_round(e, 0, x, y * 4), x + y * 4)


def test_a_context_claimed_and_left_is_kept_ready_again(own_host, guests):
    """A guest that claims the context in C and ends before any call reaches Python."""
    module = own_host.compile(guests["abi_exerciser"])
    x, y, _ = add_inputs()
    finished(own_host, module, x, y)
    for k in (2, 3):
        e = Exerciser(own_host, module)
        errno, graph = e.load_by_name("add")
        hits = fast(own_host).stats()[0]
        assert e.init(graph) == (SUCCESS, 0)
        assert e.set_input(0, 0, F32, x * k) == SUCCESS
        assert fast(own_host).stats()[0] == hits + 2  # both in C
        del e
        gc.collect()
    assert fast(own_host).stats()[2] == 0
    e = Exerciser(own_host, module)
    assert np.array_equal(add_round(e, add_context(e), x, y * 5), x + y * 5)


def test_a_finalized_context_is_kept_ready(own_host, guests):
    module = own_host.compile(guests["abi_exerciser"])
    x, y, _ = add_inputs()
    e = Exerciser(own_host, module)
    ctx = add_context(e)
    add_round(e, ctx, x, y)
    assert e.raw("finalize_execution_context", ctx) == SUCCESS
    assert e.set_input(ctx, 0, F32, x) == Errno.INVALID_ARGUMENT  # gone for this store
    other = Exerciser(own_host, module)
    errno, graph = other.load_by_name("add")
    hits = fast(own_host).stats()[0]
    assert other.init(graph) == (SUCCESS, 0)
    assert fast(own_host).stats()[0] == hits + 1
    assert np.array_equal(add_round(other, 0, x * 3, y), x * 3 + y)


def test_stores_one_after_another_on_threads_do_not_mix(own_host, guests):
    """Threads each run new stores one after another, claiming each other's ready contexts."""
    module = own_host.compile(guests["abi_exerciser"])
    errors: list[str] = []

    def worker(k: int) -> None:
        x, y, _ = add_inputs()
        for i in range(8):
            e = Exerciser(own_host, module)
            got = add_round(e, add_context(e), x + k, y * i)
            if not np.array_equal(got, (x + k) + (y * i)):
                errors.append(f"thread {k} store {i}")
            del e

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    gc.collect()
    assert errors == []
    assert fast(own_host).stats()[2] == 0  # every store's registrations went with it
