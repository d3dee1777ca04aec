/*
 * bench -- WASI reactor for host benchmarks.
 *
 *   bench_setup(name_ptr, name_len) -> errno
 *       load_by_name + init_execution_context; the context is kept in statics.
 *   bench_run(n, in_ptr, in_len, dims_ptr, dims_len, type, out_ptr, out_max)
 *       -> errno: n x (set_input(0) + compute + get_output(0)); returns the
 *       first nonzero errno, or 0.
 *   bench_alloc(size) -> ptr (0 on failure)
 */
#include <stdint.h>
#include <stdlib.h>

#include "wasi_nn.h"

#define EXPORT(name) __attribute__((export_name(name)))

static graph g_graph;
static graph_execution_context g_ctx;

EXPORT("bench_setup")
int32_t bench_setup(uint32_t name_ptr, uint32_t name_len) {
    int32_t err = wasi_nn_load_by_name((const char *)(uintptr_t)name_ptr,
                                       name_len, &g_graph);
    if (err != 0)
        return err;
    return wasi_nn_init_execution_context(g_graph, &g_ctx);
}

EXPORT("bench_run")
int32_t bench_run(uint32_t n, uint32_t in_ptr, uint32_t in_len,
                  uint32_t dims_ptr, uint32_t dims_len, uint32_t type,
                  uint32_t out_ptr, uint32_t out_max) {
    tensor t = {
        .dims = (const uint32_t *)(uintptr_t)dims_ptr,
        .dims_len = dims_len,
        .type = (uint8_t)type,
        .data = (const uint8_t *)(uintptr_t)in_ptr,
        .data_len = in_len,
    };
    for (uint32_t i = 0; i < n; i++) {
        int32_t err = wasi_nn_set_input(g_ctx, 0, &t);
        if (err != 0)
            return err;
        err = wasi_nn_compute(g_ctx);
        if (err != 0)
            return err;
        uint32_t written = 0;
        err = wasi_nn_get_output(g_ctx, 0, (uint8_t *)(uintptr_t)out_ptr,
                                 out_max, &written);
        if (err != 0)
            return err;
    }
    return 0;
}

EXPORT("bench_alloc")
uint32_t bench_alloc(uint32_t size) {
    return (uint32_t)(uintptr_t)malloc(size);
}
