/*
 * preinit_nn -- a command whose init loads its graphs by name (wasi-nn).
 *
 *   preinit_nn [MODEL_NAME]
 *
 * init: load_by_name("add") and load_by_name_with_config("add2", {...}),
 * both z = x + y over f32 [2,3]; the handles stay in globals. With
 * PREINIT_MODE=context (or bytes) in its environment, init also makes an
 * execution context (or loads a graph from bytes), which pre-initialization
 * must refuse. main runs both graphs on x = 1..6, y = 10..60, prints the
 * sums, load_by_name("add")'s handle again and, given MODEL_NAME, the handle
 * a new load_by_name gets.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "preinit.h"
#include "wasi_nn.h"

static graph g_add, g_add2;
static int init_errno;

static void init(void) {
    static const char config[] = "{\"note\": \"loaded during init\"}";
    init_errno = wasi_nn_load_by_name("add", 3, &g_add);
    if (!init_errno)
        init_errno = wasi_nn_load_by_name_with_config(
            "add2", 4, config, sizeof(config) - 1, &g_add2);
    const char *mode = getenv("PREINIT_MODE");
    if (mode && strcmp(mode, "context") == 0) {
        graph_execution_context ctx;
        init_errno = wasi_nn_init_execution_context(g_add, &ctx);
    } else if (mode && strcmp(mode, "bytes") == 0) {
        static const uint8_t junk[4] = {1, 2, 3, 4};
        graph_builder b = {junk, sizeof(junk)};
        graph g;
        init_errno = wasi_nn_load(&b, 1, GRAPH_ENCODING_ONNX,
                                  EXECUTION_TARGET_CPU, &g);
    }
}

PREINIT(init)

static void run(const char *label, graph g) {
    static const uint32_t dims[2] = {2, 3};
    static const float x[6] = {1, 2, 3, 4, 5, 6};
    static const float y[6] = {10, 20, 30, 40, 50, 60};
    graph_execution_context ctx;
    float z[6];
    uint32_t written = 0;
    tensor tx = {dims, 2, TENSOR_TYPE_F32, (const uint8_t *)x, sizeof(x)};
    tensor ty = {dims, 2, TENSOR_TYPE_F32, (const uint8_t *)y, sizeof(y)};
    int32_t err = wasi_nn_init_execution_context(g, &ctx);
    if (!err)
        err = wasi_nn_set_input(ctx, 0, &tx);
    if (!err)
        err = wasi_nn_set_input(ctx, 1, &ty);
    if (!err)
        err = wasi_nn_compute(ctx);
    if (!err)
        err = wasi_nn_get_output(ctx, 0, (uint8_t *)z, sizeof(z), &written);
    if (err) {
        fprintf(stderr, "preinit_nn: %s (graph %u): errno %d\n", label,
                (unsigned)g, (int)err);
        exit(1);
    }
    printf("%s (graph %u):", label, (unsigned)g);
    for (int i = 0; i < 6; i++)
        printf(" %g", z[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    preinit_ensure();
    printf("warm: %d\n", preinit_warm);
    if (init_errno) {
        fprintf(stderr, "preinit_nn: init failed: errno %d\n", init_errno);
        return 1;
    }
    run("add", g_add);
    run("add2", g_add2);
    graph again;
    int32_t err = wasi_nn_load_by_name("add", 3, &again);
    printf("add again: errno %d, graph %u\n", (int)err, (unsigned)again);
    if (argc > 1) {
        graph g;
        err = wasi_nn_load_by_name(argv[1], (uint32_t)strlen(argv[1]), &g);
        printf("%s: errno %d, graph %u\n", argv[1], (int)err, (unsigned)g);
    }
    return 0;
}
