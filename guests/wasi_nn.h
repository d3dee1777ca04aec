/*
 * wasi_nn.h -- guest-side imports of the wasi-nn core-module ABI
 * (module "wasi_ephemeral_nn").
 *
 * Mirrors the witx spec (WebAssembly/wasi-nn wasi-nn.witx) plus the WasmEdge
 * extensions (load_by_name_with_config, *_single, unload,
 * finalize_execution_context, errno 100..103). Every wasm-level parameter is
 * i32 and every function returns an i32 errno (0 = success).
 * tensor_type uses the CURRENT spec numbering (0 f16, 1 f32, 2 f64, 3 u8,
 * 4 i32, 5 i64).
 */
#ifndef WASI_NN_H
#define WASI_NN_H

#include <stddef.h>
#include <stdint.h>

typedef uint32_t graph;
typedef uint32_t graph_execution_context;
typedef uint16_t nn_errno;

enum {
    NN_ERRNO_SUCCESS = 0,
    NN_ERRNO_INVALID_ARGUMENT = 1,
    NN_ERRNO_INVALID_ENCODING = 2,
    NN_ERRNO_MISSING_MEMORY = 3,
    NN_ERRNO_BUSY = 4,
    NN_ERRNO_RUNTIME_ERROR = 5,
    NN_ERRNO_UNSUPPORTED_OPERATION = 6,
    NN_ERRNO_TOO_LARGE = 7,
    NN_ERRNO_NOT_FOUND = 8,
    /* WasmEdge GGML extensions */
    NN_ERRNO_END_OF_SEQUENCE = 100,
    NN_ERRNO_CONTEXT_FULL = 101,
    NN_ERRNO_PROMPT_TOO_LONG = 102,
    NN_ERRNO_MODEL_NOT_FOUND = 103,
};

typedef uint8_t graph_encoding;
enum {
    GRAPH_ENCODING_OPENVINO = 0,
    GRAPH_ENCODING_ONNX = 1,
    GRAPH_ENCODING_TENSORFLOW = 2,
    GRAPH_ENCODING_PYTORCH = 3,
    GRAPH_ENCODING_TENSORFLOWLITE = 4,
    GRAPH_ENCODING_AUTODETECT = 5,
    /* WasmEdge extensions */
    GRAPH_ENCODING_GGML = 6,
    GRAPH_ENCODING_NEURALSPEED = 7,
    GRAPH_ENCODING_BURN = 8,
    GRAPH_ENCODING_WHISPER = 9,
    GRAPH_ENCODING_MLX = 10,
    GRAPH_ENCODING_PIPER = 11,
    GRAPH_ENCODING_CHATTTS = 12,
    GRAPH_ENCODING_OPENVINOGENAI = 13,
    GRAPH_ENCODING_BITNET = 14,
};

typedef uint8_t execution_target;
enum {
    EXECUTION_TARGET_CPU = 0,
    EXECUTION_TARGET_GPU = 1,
    EXECUTION_TARGET_TPU = 2,
    EXECUTION_TARGET_AUTO = 3, /* WasmEdge */
};

typedef uint8_t tensor_type;
enum {
    TENSOR_TYPE_F16 = 0,
    TENSOR_TYPE_F32 = 1,
    TENSOR_TYPE_F64 = 2,
    TENSOR_TYPE_U8 = 3,
    TENSOR_TYPE_I32 = 4,
    TENSOR_TYPE_I64 = 5,
};

/* One graph builder: a byte buffer (8 bytes: u32 ptr, u32 len). */
typedef struct {
    const uint8_t *buf;
    uint32_t buf_len;
} graph_builder;

_Static_assert(sizeof(graph_builder) == 8, "graph_builder must be 8 bytes");

/* tensor: 20 bytes, align 4; the type is one byte followed by 3 pad bytes. */
typedef struct {
    const uint32_t *dims;
    uint32_t dims_len; /* number of u32 dims */
    uint8_t type;      /* tensor_type */
    /* 3 bytes padding */
    const uint8_t *data;
    uint32_t data_len; /* bytes */
} tensor;

_Static_assert(sizeof(tensor) == 20, "tensor must be 20 bytes");
_Static_assert(_Alignof(tensor) == 4, "tensor must be 4-aligned");
_Static_assert(offsetof(tensor, dims) == 0, "tensor.dims at +0");
_Static_assert(offsetof(tensor, dims_len) == 4, "tensor.dims_len at +4");
_Static_assert(offsetof(tensor, type) == 8, "tensor.type at +8");
_Static_assert(offsetof(tensor, data) == 12, "tensor.data at +12");
_Static_assert(offsetof(tensor, data_len) == 16, "tensor.data_len at +16");

#define WASI_NN_IMPORT(name) \
    __attribute__((import_module("wasi_ephemeral_nn"), import_name(name)))

WASI_NN_IMPORT("load")
int32_t wasi_nn_load(const graph_builder *builders, uint32_t builders_len,
                     uint32_t encoding, uint32_t target, graph *graph_out);

WASI_NN_IMPORT("load_by_name")
int32_t wasi_nn_load_by_name(const char *name, uint32_t name_len,
                             graph *graph_out);

WASI_NN_IMPORT("load_by_name_with_config")
int32_t wasi_nn_load_by_name_with_config(const char *name, uint32_t name_len,
                                         const char *config,
                                         uint32_t config_len,
                                         graph *graph_out);

WASI_NN_IMPORT("init_execution_context")
int32_t wasi_nn_init_execution_context(graph g,
                                       graph_execution_context *ctx_out);

WASI_NN_IMPORT("set_input")
int32_t wasi_nn_set_input(graph_execution_context ctx, uint32_t index,
                          const tensor *t);

WASI_NN_IMPORT("compute")
int32_t wasi_nn_compute(graph_execution_context ctx);

WASI_NN_IMPORT("get_output")
int32_t wasi_nn_get_output(graph_execution_context ctx, uint32_t index,
                           uint8_t *out, uint32_t out_max,
                           uint32_t *written_out);

WASI_NN_IMPORT("get_output_single")
int32_t wasi_nn_get_output_single(graph_execution_context ctx, uint32_t index,
                                  uint8_t *out, uint32_t out_max,
                                  uint32_t *written_out);

WASI_NN_IMPORT("compute_single")
int32_t wasi_nn_compute_single(graph_execution_context ctx);

WASI_NN_IMPORT("fini_single")
int32_t wasi_nn_fini_single(graph_execution_context ctx);

WASI_NN_IMPORT("unload")
int32_t wasi_nn_unload(graph g);

WASI_NN_IMPORT("finalize_execution_context")
int32_t wasi_nn_finalize_execution_context(graph_execution_context ctx);

#endif /* WASI_NN_H */
