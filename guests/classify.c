/*
 * classify -- ImageNet classifier guest (WASI command).
 *
 *   classify MODEL_NAME IMAGE.ppm LABELS.txt
 *
 * MODEL_NAME is a host-registered name (load_by_name); if it ends in ".onnx"
 * it is instead read as a file and passed to load (encoding onnx, target cpu).
 * IMAGE.ppm must be a binary P6 224x224 PPM with maxval 255.
 * Prints the top-5 classes as "%d: %s (class %d, p=%.4f)".
 *
 * Built as classify_preinit (CLASSIFY_PREINIT, guests/preinit.h), it can be
 * pre-initialized: init loads $CLASSIFY_MODEL by name and reads the labels
 * file $CLASSIFY_LABELS; main uses them when its arguments name the same.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

#define W 224
#define H 224
#define NCLASSES 1000
#define TOPK 5

static const float MEAN[3] = {0.485f, 0.456f, 0.406f};
static const float STD[3] = {0.229f, 0.224f, 0.225f};

static void nn_check(const char *call, int32_t err) {
    if (err != 0) {
        fprintf(stderr, "classify: %s failed: errno %d\n", call, (int)err);
        exit(1);
    }
}

/* Read a whole file; returns NULL (with message) on failure. */
static unsigned char *read_file(const char *path, size_t *len_out) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "classify: cannot open %s\n", path);
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    unsigned char *buf = malloc(cap);
    if (!buf) {
        fclose(f);
        fprintf(stderr, "classify: out of memory reading %s\n", path);
        return NULL;
    }
    for (;;) {
        if (len == cap) {
            cap *= 2;
            unsigned char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                fclose(f);
                fprintf(stderr, "classify: out of memory reading %s\n", path);
                return NULL;
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (n == 0) {
            if (ferror(f)) {
                free(buf);
                fclose(f);
                fprintf(stderr, "classify: error reading %s\n", path);
                return NULL;
            }
            break;
        }
    }
    fclose(f);
    *len_out = len;
    return buf;
}

static int is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
           c == '\f';
}

/* Skip whitespace and '#' comments (to end of line). */
static void skip_ws(const unsigned char *p, size_t len, size_t *pos) {
    while (*pos < len) {
        if (is_space(p[*pos])) {
            (*pos)++;
        } else if (p[*pos] == '#') {
            while (*pos < len && p[*pos] != '\n' && p[*pos] != '\r')
                (*pos)++;
        } else {
            break;
        }
    }
}

static int read_uint(const unsigned char *p, size_t len, size_t *pos,
                     long *out) {
    skip_ws(p, len, pos);
    if (*pos >= len || p[*pos] < '0' || p[*pos] > '9')
        return -1;
    long v = 0;
    while (*pos < len && p[*pos] >= '0' && p[*pos] <= '9') {
        v = v * 10 + (p[*pos] - '0');
        if (v > 1000000)
            return -1;
        (*pos)++;
    }
    *out = v;
    return 0;
}

/* Parse PPM into a newly allocated NCHW float tensor [1,3,H,W]. */
static float *load_ppm(const char *path) {
    size_t len;
    unsigned char *p = read_file(path, &len);
    if (!p)
        exit(2);
    size_t pos = 0;
    long w, h, maxval;
    if (len < 2 || p[0] != 'P' || p[1] != '6') {
        fprintf(stderr, "classify: %s: not a binary PPM (P6)\n", path);
        exit(2);
    }
    pos = 2;
    if (read_uint(p, len, &pos, &w) || read_uint(p, len, &pos, &h) ||
        read_uint(p, len, &pos, &maxval)) {
        fprintf(stderr, "classify: %s: malformed PPM header\n", path);
        exit(2);
    }
    if (pos >= len || !is_space(p[pos])) {
        fprintf(stderr, "classify: %s: malformed PPM header\n", path);
        exit(2);
    }
    pos++; /* exactly one whitespace byte before the raster */
    if (w != W || h != H) {
        fprintf(stderr,
                "classify: %s: image is %ldx%ld, expected %dx%d\n", path, w,
                h, W, H);
        exit(2);
    }
    if (maxval != 255) {
        fprintf(stderr, "classify: %s: maxval %ld, expected 255\n", path,
                maxval);
        exit(2);
    }
    if (len - pos < (size_t)W * H * 3) {
        fprintf(stderr, "classify: %s: truncated pixel data\n", path);
        exit(2);
    }
    const unsigned char *px = p + pos;
    float *t = malloc(sizeof(float) * 3 * W * H);
    if (!t) {
        fprintf(stderr, "classify: out of memory\n");
        exit(2);
    }
    for (int y = 0; y < H; y++) {
        for (int x = 0; x < W; x++) {
            const unsigned char *rgb = px + ((size_t)y * W + x) * 3;
            for (int c = 0; c < 3; c++) {
                float v = (float)rgb[c] / 255.0f;
                t[(size_t)c * W * H + (size_t)y * W + x] =
                    (v - MEAN[c]) / STD[c];
            }
        }
    }
    free(p);
    return t;
}

/* Split labels file into lines (trailing \n / \r stripped). */
static char **load_labels(const char *path, size_t *count) {
    size_t len;
    unsigned char *buf = read_file(path, &len);
    if (!buf)
        exit(2);
    char *text = realloc(buf, len + 1);
    if (!text) {
        fprintf(stderr, "classify: out of memory\n");
        exit(2);
    }
    text[len] = '\0';
    size_t n = 0, cap = 1024;
    char **lines = malloc(sizeof(char *) * cap);
    if (!lines) {
        fprintf(stderr, "classify: out of memory\n");
        exit(2);
    }
    char *s = text;
    while (s < text + len) {
        char *nl = memchr(s, '\n', (size_t)(text + len - s));
        char *end = nl ? nl : text + len;
        char *e = end;
        while (e > s && (e[-1] == '\r' || e[-1] == '\n'))
            e--;
        *e = '\0';
        if (n == cap) {
            cap *= 2;
            char **nl2 = realloc(lines, sizeof(char *) * cap);
            if (!nl2) {
                fprintf(stderr, "classify: out of memory\n");
                exit(2);
            }
            lines = nl2;
        }
        lines[n++] = s;
        if (!nl)
            break;
        s = nl + 1;
    }
    *count = n;
    return lines;
}

#ifdef CLASSIFY_PREINIT
#include "preinit.h"

static const char *init_model, *init_labels_path;
static graph init_graph;
static char **init_labels;
static size_t init_nlabels;

/* Named graphs and files only: contexts can't be in a snapshot (the rule). */
static void init(void) {
    const char *model = getenv("CLASSIFY_MODEL");
    const char *labels = getenv("CLASSIFY_LABELS");
    if (model && wasi_nn_load_by_name(model, (uint32_t)strlen(model),
                                      &init_graph) == 0)
        init_model = strdup(model);
    if (labels) {
        init_labels = load_labels(labels, &init_nlabels);
        init_labels_path = strdup(labels);
    }
}

PREINIT(init)
#endif

static int ends_with(const char *s, const char *suffix) {
    size_t ls = strlen(s), lx = strlen(suffix);
    return ls >= lx && strcmp(s + ls - lx, suffix) == 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: classify MODEL_NAME|MODEL.onnx IMAGE.ppm "
                        "LABELS.txt\n");
        return 2;
    }
    const char *model = argv[1];
    float *input = load_ppm(argv[2]);
    size_t nlabels;
    char **labels;
    graph g = 0;
#ifdef CLASSIFY_PREINIT
    preinit_ensure();
    if (init_labels_path && strcmp(argv[3], init_labels_path) == 0) {
        labels = init_labels;
        nlabels = init_nlabels;
    } else
#endif
        labels = load_labels(argv[3], &nlabels);

#ifdef CLASSIFY_PREINIT
    if (init_model && strcmp(model, init_model) == 0)
        g = init_graph;
    else
#endif
    if (ends_with(model, ".onnx")) {
        size_t mlen;
        unsigned char *bytes = read_file(model, &mlen);
        if (!bytes)
            return 2;
        graph_builder b = {bytes, (uint32_t)mlen};
        nn_check("load", wasi_nn_load(&b, 1, GRAPH_ENCODING_ONNX,
                                      EXECUTION_TARGET_CPU, &g));
        free(bytes);
    } else {
        nn_check("load_by_name",
                 wasi_nn_load_by_name(model, (uint32_t)strlen(model), &g));
    }

    graph_execution_context ctx = 0;
    nn_check("init_execution_context",
             wasi_nn_init_execution_context(g, &ctx));

    static const uint32_t dims[4] = {1, 3, H, W};
    tensor t = {
        .dims = dims,
        .dims_len = 4,
        .type = TENSOR_TYPE_F32,
        .data = (const uint8_t *)input,
        .data_len = (uint32_t)(sizeof(float) * 3 * W * H),
    };
    nn_check("set_input", wasi_nn_set_input(ctx, 0, &t));
    nn_check("compute", wasi_nn_compute(ctx));

    static float out[NCLASSES];
    uint32_t written = 0;
    nn_check("get_output",
             wasi_nn_get_output(ctx, 0, (uint8_t *)out, sizeof(out),
                                &written));
    size_t n = written / sizeof(float);
    if (n > NCLASSES)
        n = NCLASSES;
    if (n == 0) {
        fprintf(stderr, "classify: empty output\n");
        return 1;
    }

    /* numerically stable softmax in double precision */
    static double prob[NCLASSES];
    double mx = out[0];
    for (size_t i = 1; i < n; i++)
        if (out[i] > mx)
            mx = out[i];
    double sum = 0.0;
    for (size_t i = 0; i < n; i++) {
        prob[i] = exp((double)out[i] - mx);
        sum += prob[i];
    }
    for (size_t i = 0; i < n; i++)
        prob[i] /= sum;

    /* top-k by repeated selection (ties: lowest index first) */
    static unsigned char used[NCLASSES];
    size_t k = n < TOPK ? n : TOPK;
    for (size_t r = 0; r < k; r++) {
        size_t best = (size_t)-1;
        for (size_t i = 0; i < n; i++) {
            if (used[i])
                continue;
            if (best == (size_t)-1 || prob[i] > prob[best])
                best = i;
        }
        used[best] = 1;
        const char *label = best < nlabels ? labels[best] : "?";
        printf("%d: %s (class %d, p=%.4f)\n", (int)(r + 1), label, (int)best,
               prob[best]);
    }

    /* No finalize_execution_context: it is WasmEdge-only, and leaving it out
     * keeps this guest's imports to the portable witx subset. */
    free(input);
    return 0;
}
