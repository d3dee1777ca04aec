/*
 * abi_exerciser -- WASI reactor that forwards raw i32 values to every
 * wasi_ephemeral_nn import, so host tests can drive the ABI (including with
 * invalid pointers, lengths and handles) from inside a real guest.
 *
 * Each ex_<name> export takes the same i32 params as the import <name> and
 * returns its errno unchanged. ex_alloc/ex_free/ex_mem_size let tests place
 * data in guest memory and write it through the exported `memory`.
 */
#include <stdint.h>
#include <stdlib.h>

#define RAW_IMPORT(name) \
    __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))
#define EXPORT(name) __attribute__((export_name(name)))

/* Raw prototypes: every parameter is a plain u32 (pointers included). */
RAW_IMPORT("load")
int32_t raw_load(uint32_t builders_ptr, uint32_t builders_len,
                 uint32_t encoding, uint32_t target, uint32_t graph_out);
RAW_IMPORT("load_by_name")
int32_t raw_load_by_name(uint32_t name_ptr, uint32_t name_len,
                         uint32_t graph_out);
RAW_IMPORT("load_by_name_with_config")
int32_t raw_load_by_name_with_config(uint32_t name_ptr, uint32_t name_len,
                                     uint32_t cfg_ptr, uint32_t cfg_len,
                                     uint32_t graph_out);
RAW_IMPORT("init_execution_context")
int32_t raw_init_execution_context(uint32_t graph, uint32_t ctx_out);
RAW_IMPORT("set_input")
int32_t raw_set_input(uint32_t ctx, uint32_t index, uint32_t tensor_ptr);
RAW_IMPORT("compute")
int32_t raw_compute(uint32_t ctx);
RAW_IMPORT("get_output")
int32_t raw_get_output(uint32_t ctx, uint32_t index, uint32_t out_ptr,
                       uint32_t out_max, uint32_t written_out);
RAW_IMPORT("get_output_single")
int32_t raw_get_output_single(uint32_t ctx, uint32_t index, uint32_t out_ptr,
                              uint32_t out_max, uint32_t written_out);
RAW_IMPORT("compute_single")
int32_t raw_compute_single(uint32_t ctx);
RAW_IMPORT("fini_single")
int32_t raw_fini_single(uint32_t ctx);
RAW_IMPORT("unload")
int32_t raw_unload(uint32_t graph);
RAW_IMPORT("finalize_execution_context")
int32_t raw_finalize_execution_context(uint32_t ctx);

EXPORT("ex_load")
int32_t ex_load(uint32_t builders_ptr, uint32_t builders_len,
                uint32_t encoding, uint32_t target, uint32_t graph_out) {
    return raw_load(builders_ptr, builders_len, encoding, target, graph_out);
}

EXPORT("ex_load_by_name")
int32_t ex_load_by_name(uint32_t name_ptr, uint32_t name_len,
                        uint32_t graph_out) {
    return raw_load_by_name(name_ptr, name_len, graph_out);
}

EXPORT("ex_load_by_name_with_config")
int32_t ex_load_by_name_with_config(uint32_t name_ptr, uint32_t name_len,
                                    uint32_t cfg_ptr, uint32_t cfg_len,
                                    uint32_t graph_out) {
    return raw_load_by_name_with_config(name_ptr, name_len, cfg_ptr, cfg_len,
                                        graph_out);
}

EXPORT("ex_init_execution_context")
int32_t ex_init_execution_context(uint32_t graph, uint32_t ctx_out) {
    return raw_init_execution_context(graph, ctx_out);
}

EXPORT("ex_set_input")
int32_t ex_set_input(uint32_t ctx, uint32_t index, uint32_t tensor_ptr) {
    return raw_set_input(ctx, index, tensor_ptr);
}

EXPORT("ex_compute")
int32_t ex_compute(uint32_t ctx) { return raw_compute(ctx); }

EXPORT("ex_get_output")
int32_t ex_get_output(uint32_t ctx, uint32_t index, uint32_t out_ptr,
                      uint32_t out_max, uint32_t written_out) {
    return raw_get_output(ctx, index, out_ptr, out_max, written_out);
}

EXPORT("ex_get_output_single")
int32_t ex_get_output_single(uint32_t ctx, uint32_t index, uint32_t out_ptr,
                             uint32_t out_max, uint32_t written_out) {
    return raw_get_output_single(ctx, index, out_ptr, out_max, written_out);
}

EXPORT("ex_compute_single")
int32_t ex_compute_single(uint32_t ctx) { return raw_compute_single(ctx); }

EXPORT("ex_fini_single")
int32_t ex_fini_single(uint32_t ctx) { return raw_fini_single(ctx); }

EXPORT("ex_unload")
int32_t ex_unload(uint32_t graph) { return raw_unload(graph); }

EXPORT("ex_finalize_execution_context")
int32_t ex_finalize_execution_context(uint32_t ctx) {
    return raw_finalize_execution_context(ctx);
}

/* Memory helpers for the test harness. Returns 0 when malloc fails. */
EXPORT("ex_alloc")
uint32_t ex_alloc(uint32_t size) { return (uint32_t)(uintptr_t)malloc(size); }

EXPORT("ex_free")
void ex_free(uint32_t ptr) { free((void *)(uintptr_t)ptr); }

EXPORT("ex_mem_size")
uint32_t ex_mem_size(void) {
    return (uint32_t)(__builtin_wasm_memory_size(0) * 65536u);
}
