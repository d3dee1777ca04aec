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
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "image.h"
#include "wasi_nn.h"

#define W IMG_SIZE
#define H IMG_SIZE
#define NCLASSES 1000
#define TOPK 5

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
    unsigned char *buf = read_all(f, len_out);
    fclose(f);
    if (!buf)
        fprintf(stderr, "classify: error reading %s\n", path);
    return buf;
}

/* Parse PPM into a newly allocated NCHW float tensor [1,3,H,W]. */
static float *load_ppm(const char *path) {
    size_t len;
    unsigned char *p = read_file(path, &len);
    if (!p)
        exit(2);
    ppm_t img;
    const char *err = ppm_parse(p, len, &img);
    if (err) {
        fprintf(stderr, "classify: %s: %s\n", path, err);
        exit(2);
    }
    if (img.width != W || img.height != H) {
        fprintf(stderr,
                "classify: %s: image is %ldx%ld, expected %dx%d\n", path,
                img.width, img.height, W, H);
        exit(2);
    }
    float *t = malloc(sizeof(float) * 3 * W * H);
    if (!t) {
        fprintf(stderr, "classify: out of memory\n");
        exit(2);
    }
    image_normalize(img.rgb, t);
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
    char **lines = NULL;
    if (text) {
        text[len] = '\0';
        lines = split_lines(text, len, count);
    }
    if (!lines) {
        fprintf(stderr, "classify: out of memory\n");
        exit(2);
    }
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

    static float out[NCLASSES];
    uint32_t written;
    const char *failed = "";
    int32_t err = classify_scores(g, input, out, sizeof out, &written, &failed);
    nn_check(failed, err);
    size_t n = written / sizeof(float);
    if (n > NCLASSES)
        n = NCLASSES;
    if (n == 0) {
        fprintf(stderr, "classify: empty output\n");
        return 1;
    }

    static double prob[NCLASSES];
    size_t best[TOPK];
    size_t k = top_k(out, n, TOPK, prob, best);
    for (size_t r = 0; r < k; r++) {
        const char *label = best[r] < nlabels ? labels[best[r]] : "?";
        printf("%d: %s (class %d, p=%.4f)\n", (int)(r + 1), label,
               (int)best[r], prob[best[r]]);
    }

    free(input);
    return 0;
}
