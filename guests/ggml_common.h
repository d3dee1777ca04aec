/*
 * ggml_common.h -- helpers shared by the GGML (llama.cpp) guests chat, stream
 * and embed: option parsing, the load-time config JSON, a growable byte
 * buffer, output reads that grow on too_large, and errno checks.
 *
 * WasmEdge conventions (as LlamaEdge apps use them): models are loaded with
 * load_by_name_with_config(name, config_json); input 0 is the prompt as a u8
 * tensor with dims [1] and data_len = the prompt's byte length; output 0 is
 * the generated text, output 1 the JSON {"input_tokens":N,"output_tokens":M}.
 *
 * Define PROG (the program name used in messages) before including this.
 */
#ifndef GGML_COMMON_H
#define GGML_COMMON_H

#ifndef PROG
#error "define PROG before including ggml_common.h"
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

/* Each guest uses a subset of these helpers. */
#define HELPER static __attribute__((unused))

/* ---- errors ------------------------------------------------------------ */

__attribute__((noreturn, format(printf, 2, 3))) HELPER void
die(int status, const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    fputs(PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

/* Any non-zero errno is fatal: "PROG: <call> failed: errno N", exit 1. */
HELPER void nn_check(const char *call, int32_t err) {
    if (err != NN_ERRNO_SUCCESS)
        die(1, "%s failed: errno %d", call, (int)err);
}

/* ---- growable byte buffer (always NUL-terminated) ---------------------- */

typedef struct {
    char *p;
    size_t len, cap; /* cap excludes the byte kept for the terminating NUL */
} buf_t;

#define BUF_LIMIT ((size_t)1 << 30)

HELPER void buf_reserve(buf_t *b, size_t need) {
    if (need <= b->cap && b->p)
        return;
    if (need > BUF_LIMIT)
        die(1, "out of memory (%zu bytes wanted)", need);
    size_t cap = b->cap ? b->cap : 64;
    while (cap < need)
        cap *= 2;
    char *p = realloc(b->p, cap + 1);
    if (!p)
        die(1, "out of memory (%zu bytes wanted)", need);
    b->p = p;
    b->cap = cap;
    b->p[b->len] = '\0';
}

HELPER void buf_append(buf_t *b, const char *s, size_t n) {
    buf_reserve(b, b->len + n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = '\0';
}

HELPER void buf_puts(buf_t *b, const char *s) { buf_append(b, s, strlen(s)); }

__attribute__((format(printf, 2, 3))) HELPER void
buf_printf(buf_t *b, const char *fmt, ...) {
    char tmp[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp)
        die(1, "internal error: formatted value too long");
    buf_append(b, tmp, (size_t)n);
}

/* ---- options ----------------------------------------------------------- */

enum {
    OPT_N_PREDICT = 1 << 0,
    OPT_TEMP = 1 << 1,
    OPT_SEED = 1 << 2,
    OPT_CTX_SIZE = 1 << 3,
    OPT_SYSTEM = 1 << 4,
    OPT_STREAM = 1 << 5,
};

typedef struct {
    const char *model;  /* --model NAME (default "default") */
    unsigned given;     /* OPT_* bits of the options that were given */
    long long n_predict, seed, ctx_size;
    double temp;
    const char *system; /* --system TEXT */
    int stream;         /* --stream */
    buf_t words;        /* the positional words, joined with single spaces */
    int nwords;
} opts_t;

static const char *g_usage;

/* A usage error: "PROG: <message>" and the usage line on stderr, exit 2. */
__attribute__((noreturn, format(printf, 1, 2))) HELPER void
usage_error(const char *fmt, ...) {
    va_list ap;
    fputs(PROG ": ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nusage: %s\n", g_usage);
    exit(2);
}

HELPER long long parse_int(const char *opt, const char *s, long long lo,
                           long long hi) {
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (*s == '\0' || *end != '\0' || errno == ERANGE || v < lo || v > hi) {
        usage_error("%s: invalid value '%s' (expected an integer in "
                    "[%lld, %lld])", opt, s, lo, hi);
    }
    return v;
}

HELPER double parse_num(const char *opt, const char *s, double lo, double hi) {
    char *end;
    double v = strtod(s, &end);
    /* the negated test also rejects NaN */
    if (*s == '\0' || *end != '\0' || !(v >= lo && v <= hi)) {
        usage_error("%s: invalid value '%s' (expected a number in "
                    "[%g, %g])", opt, s, lo, hi);
    }
    return v;
}

/*
 * Parse "[--model NAME] [options] WORDS...". `allowed` is a mask of OPT_*.
 * Options come first ("--opt VALUE" or "--opt=VALUE"); the first
 * non-option argument, or "--", ends them. Usage errors exit 2.
 */
HELPER void parse_opts(int argc, char **argv, unsigned allowed,
                       const char *usage, opts_t *o) {
    static const struct {
        const char *name;
        unsigned bit; /* 0: --model */
        int has_value;
    } table[] = {
        {"--model", 0, 1},
        {"--n-predict", OPT_N_PREDICT, 1},
        {"--temp", OPT_TEMP, 1},
        {"--seed", OPT_SEED, 1},
        {"--ctx-size", OPT_CTX_SIZE, 1},
        {"--system", OPT_SYSTEM, 1},
        {"--stream", OPT_STREAM, 0},
    };
    memset(o, 0, sizeof *o);
    o->model = "default";
    g_usage = usage;
    int i = 1;
    for (; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(arg, "-h") == 0 || strcmp(arg, "--help") == 0) {
            printf("usage: %s\n", usage);
            exit(0);
        }
        if (arg[0] != '-' || arg[1] == '\0')
            break; /* first positional word */
        const char *eq = strchr(arg, '=');
        size_t nlen = eq ? (size_t)(eq - arg) : strlen(arg);
        size_t k = 0, n = sizeof table / sizeof table[0];
        for (; k < n; k++)
            if (strlen(table[k].name) == nlen &&
                strncmp(table[k].name, arg, nlen) == 0)
                break;
        if (k == n || (table[k].bit && !(allowed & table[k].bit)))
            usage_error("unknown option '%s'", arg);
        const char *name = table[k].name, *val = NULL;
        if (table[k].has_value) {
            if (eq)
                val = eq + 1;
            else if (i + 1 < argc)
                val = argv[++i];
            else
                usage_error("option '%s' needs a value", name);
        } else if (eq) {
            usage_error("option '%s' takes no value", name);
        }
        o->given |= table[k].bit;
        switch (table[k].bit) {
        case 0:
            if (*val == '\0')
                usage_error("%s: empty model name", name);
            o->model = val;
            break;
        case OPT_N_PREDICT:
            o->n_predict = parse_int(name, val, -1, INT32_MAX);
            break;
        case OPT_TEMP:
            o->temp = parse_num(name, val, 0.0, 1000.0);
            break;
        case OPT_SEED:
            o->seed = parse_int(name, val, 0, UINT32_MAX);
            break;
        case OPT_CTX_SIZE:
            o->ctx_size = parse_int(name, val, 0, INT32_MAX);
            break;
        case OPT_SYSTEM:
            o->system = val;
            break;
        case OPT_STREAM:
            o->stream = 1;
            break;
        }
    }
    buf_reserve(&o->words, 0);
    for (; i < argc; i++, o->nwords++) {
        if (o->nwords)
            buf_append(&o->words, " ", 1);
        buf_puts(&o->words, argv[i]);
    }
}

/* v as a JSON float: the shortest "%.Ng" that reads back as v, with ".0"
 * added to an integral value so that it still parses as a float (0 -> 0.0).
 * v is finite and non-negative here. */
HELPER void buf_put_double(buf_t *b, double v) {
    char tmp[40];
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof tmp, "%.*g", prec, v);
        if (strtod(tmp, NULL) == v)
            break;
    }
    buf_puts(b, tmp);
    if (!strpbrk(tmp, ".e"))
        buf_puts(b, ".0");
}

/* The load-time config: the given options, plus "stream-stdout":false (the
 * guest prints the text itself; the host must not). */
HELPER void build_config(const opts_t *o, buf_t *cfg) {
    buf_puts(cfg, "{");
    if (o->given & OPT_N_PREDICT)
        buf_printf(cfg, "\"n-predict\":%lld,", o->n_predict);
    if (o->given & OPT_CTX_SIZE)
        buf_printf(cfg, "\"ctx-size\":%lld,", o->ctx_size);
    if (o->given & OPT_TEMP) {
        buf_puts(cfg, "\"temp\":");
        buf_put_double(cfg, o->temp);
        buf_puts(cfg, ",");
    }
    if (o->given & OPT_SEED)
        buf_printf(cfg, "\"seed\":%lld,", o->seed);
    buf_puts(cfg, "\"stream-stdout\":false}");
}

/* ---- wasi-nn calls ----------------------------------------------------- */

/* load_by_name_with_config + init_execution_context. */
HELPER graph_execution_context ggml_open(const char *model,
                                         const char *config) {
    graph g = 0;
    nn_check("load_by_name_with_config",
             wasi_nn_load_by_name_with_config(model, (uint32_t)strlen(model),
                                              config, (uint32_t)strlen(config),
                                              &g));
    graph_execution_context ctx = 0;
    nn_check("init_execution_context",
             wasi_nn_init_execution_context(g, &ctx));
    return ctx;
}

/* set_input(index) with bytes: a u8 tensor, dims [1], data_len = len. */
HELPER void set_bytes(graph_execution_context ctx, uint32_t index,
                      const char *data, size_t len) {
    static const uint32_t dims[1] = {1};
    tensor t = {
        .dims = dims,
        .dims_len = 1,
        .type = TENSOR_TYPE_U8,
        .data = (const uint8_t *)data,
        .data_len = (uint32_t)len,
    };
    nn_check("set_input", wasi_nn_set_input(ctx, index, &t));
}

/*
 * get_output (or get_output_single) of `index` into out (replacing its
 * contents). On too_large the host wrote the size it needs to written_out:
 * grow to that (at least double, should the host under-report) and retry.
 */
HELPER void read_output(graph_execution_context ctx, uint32_t index,
                        int single, buf_t *out) {
    const char *call = single ? "get_output_single" : "get_output";
    out->len = 0;
    buf_reserve(out, single ? 256 : 4096);
    for (;;) {
        uint32_t written = 0;
        uint32_t max = out->cap > UINT32_MAX ? UINT32_MAX : (uint32_t)out->cap;
        int32_t err =
            single ? wasi_nn_get_output_single(ctx, index, (uint8_t *)out->p,
                                               max, &written)
                   : wasi_nn_get_output(ctx, index, (uint8_t *)out->p, max,
                                        &written);
        if (err == NN_ERRNO_TOO_LARGE) {
            size_t need = written > max ? (size_t)written : (size_t)max * 2;
            buf_reserve(out, need);
            continue;
        }
        nn_check(call, err);
        if (written > max)
            die(1, "%s: host reported %u bytes written into a %u-byte buffer",
                call, (unsigned)written, (unsigned)max);
        out->len = written;
        out->p[out->len] = '\0';
        return;
    }
}

/* Find "key" in json and read the unsigned integer after its colon. */
HELPER int json_uint(const char *json, const char *key, unsigned long long *v) {
    char pat[64];
    snprintf(pat, sizeof pat, "\"%s\"", key);
    const char *s = strstr(json, pat);
    if (!s)
        return -1;
    s += strlen(pat);
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    if (*s++ != ':')
        return -1;
    while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')
        s++;
    if (*s < '0' || *s > '9')
        return -1;
    *v = strtoull(s, NULL, 10);
    return 0;
}

/* get_output(1) and print "[input_tokens=N output_tokens=M]" to stderr. */
HELPER void print_token_stats(graph_execution_context ctx) {
    buf_t meta = {0};
    unsigned long long in = 0, out = 0;
    read_output(ctx, 1, 0, &meta);
    if (json_uint(meta.p, "input_tokens", &in) ||
        json_uint(meta.p, "output_tokens", &out))
        fprintf(stderr, PROG ": no token counts in output 1: %s\n", meta.p);
    else
        fprintf(stderr, "[input_tokens=%llu output_tokens=%llu]\n", in, out);
    free(meta.p);
}

/*
 * What ended a generation. compute/compute_single report it as an errno:
 * 100 end_of_sequence is the normal end, 101 context_full truncates the
 * output (warning), 102 prompt_too_long means nothing was generated.
 * Anything else non-zero is fatal.
 */
typedef enum {
    GEN_MORE,
    GEN_DONE,
    GEN_CONTEXT_FULL,
    GEN_PROMPT_TOO_LONG,
} gen_t;

HELPER gen_t gen_status(const char *call, int32_t err) {
    switch (err) {
    case NN_ERRNO_SUCCESS:
        return GEN_MORE;
    case NN_ERRNO_END_OF_SEQUENCE:
        return GEN_DONE;
    case NN_ERRNO_CONTEXT_FULL:
        fprintf(stderr, PROG ": context full (errno %d), output truncated\n",
                (int)err);
        return GEN_CONTEXT_FULL;
    case NN_ERRNO_PROMPT_TOO_LONG:
        fprintf(stderr, PROG ": prompt too long (errno %d)\n", (int)err);
        return GEN_PROMPT_TOO_LONG;
    default:
        nn_check(call, err);
        return GEN_DONE; /* unreachable */
    }
}

/* ---- ChatML replies ----------------------------------------------------- */

/* The end-of-turn marker a ChatML model may emit literally. */
static const char END[] __attribute__((unused)) = "<|im_end|>";
#define END_LEN (sizeof END - 1)

HELPER int is_ws(char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

/*
 * Length of the tail of s[0..n) that is, or may still become, a trailing
 * "<|im_end|>": the marker followed only by whitespace, or (unless
 * complete_only) a proper prefix of the marker at the very end.
 */
HELPER size_t end_tail(const char *s, size_t n, int complete_only) {
    size_t e = n;
    while (e > 0 && is_ws(s[e - 1]))
        e--;
    if (e >= END_LEN && memcmp(s + e - END_LEN, END, END_LEN) == 0)
        return n - (e - END_LEN);
    if (complete_only)
        return 0;
    for (size_t k = n < END_LEN - 1 ? n : END_LEN - 1; k > 0; k--)
        if (memcmp(s + n - k, END, k) == 0)
            return k;
    return 0;
}

HELPER void trim_end_marker(buf_t *reply) {
    reply->len -= end_tail(reply->p, reply->len, 1);
    reply->p[reply->len] = '\0';
}

/* Append a user turn and the assistant's opening to a ChatML history. */
HELPER void chatml_user_turn(buf_t *history, const char *user, size_t len) {
    buf_puts(history, "<|im_start|>user\n");
    buf_append(history, user, len);
    buf_puts(history, "<|im_end|>\n<|im_start|>assistant\n");
}

#endif /* GGML_COMMON_H */
