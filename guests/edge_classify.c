/*
 * edge_classify -- the ImageNet classifier as an HTTP handler (`wasinn serve
 * --route /classify=edge_classify.wasm`).
 *
 *   POST a binary PPM (P6, 8-bit) -> application/json:
 *   {"model":"efficientnet-lite0","width":451,"height":300,
 *    "top5":[{"class":285,"label":"Egyptian cat","p":0.61},...]}
 *
 * The image is resized as the classifier was trained to see it (short side
 * 256, centre crop 224; a 224x224 image is taken as it is) and normalized as
 * guests/classify.c does. Environment: MODEL, the host's name for the model
 * (default efficientnet-lite0); LABELS, a file of class names, one a line
 * (default /data/imagenet_labels.txt; without it "label" is null).
 * A body that is not such an image: 400 with the reason.
 *
 * Pre-initializable (guests/preinit.h): the init loads the model by name and
 * reads the labels, so `wasinn preinit` (with the same MODEL and LABELS) makes
 * a module whose every instance starts with both; a request naming another
 * model or labels file still gets them, loaded then.
 */
#include <stdint.h>
#include <string.h>

#include "cgi.h"
#include "image.h"
#include "preinit.h"
#include "wasi_nn.h"

#define NCLASSES 1000
#define TOPK 5

static void nn_check(const char *call, int32_t err) {
    if (err != 0)
        cgi_fail("500 Internal Server Error", "%s failed: errno %d", call,
                 (int)err);
}

/* The labels file's lines, or NULL (labels are optional). */
static char **load_labels(const char *path, size_t *count) {
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t len;
    unsigned char *buf = read_all(f, &len);
    fclose(f);
    char *text = buf ? realloc(buf, len + 1) : NULL;
    if (!text)
        return NULL;
    text[len] = '\0';
    return split_lines(text, len, count);
}

#define DEFAULT_MODEL "efficientnet-lite0"
#define DEFAULT_LABELS "/data/imagenet_labels.txt"

/* What init left: the graph, the labels, and the names they were made from. */
static char *init_model, *init_labels_path;
static graph init_graph;
static char **init_labels;
static size_t init_nlabels;

/* Named graphs and files only: contexts cannot be in a snapshot (the rule). */
static void init(void) {
    const char *model = cgi_env("MODEL", DEFAULT_MODEL);
    const char *labels = cgi_env("LABELS", DEFAULT_LABELS);
    if (wasi_nn_load_by_name(model, (uint32_t)strlen(model), &init_graph) == 0)
        init_model = strdup(model);
    init_labels = load_labels(labels, &init_nlabels);
    init_labels_path = strdup(labels);
}

PREINIT(init)

int main(int argc, char **argv) {
    (void)argc; /* WAGI passes the module's name only */
    (void)argv;
    preinit_ensure();
    const char *model = cgi_env("MODEL", DEFAULT_MODEL);
    size_t len;
    const char *length = cgi_env("CONTENT_LENGTH", "");
    unsigned char *body = read_all_hinted(stdin, (size_t)strtoul(length, NULL, 10), &len);
    if (!body)
        cgi_fail("500 Internal Server Error", "cannot read the request body");
    ppm_t img;
    const char *err = ppm_parse(body, len, &img);
    if (err)
        cgi_fail("400 Bad Request", "the body is not a usable image: %s "
                 "(send a binary PPM, P6 with maxval 255)", err);
    /* a 224x224 image is taken as it is, straight from the body */
    const unsigned char *pixels = img.rgb;
    if (img.width != IMG_SIZE || img.height != IMG_SIZE) {
        static unsigned char rgb[IMG_SIZE * IMG_SIZE * 3];
        err = image_crop(&img, rgb);
        if (err)
            cgi_fail("400 Bad Request", "%s", err);
        pixels = rgb;
    }
    static float input[3 * IMG_SIZE * IMG_SIZE];
    image_normalize(pixels, input);
    free(body);

    graph g = init_graph;
    if (!init_model || strcmp(model, init_model) != 0)
        nn_check("load_by_name",
                 wasi_nn_load_by_name(model, (uint32_t)strlen(model), &g));
    static float out[NCLASSES];
    uint32_t written;
    const char *failed = "";
    int32_t errno_nn = classify_scores(g, input, out, sizeof out, &written, &failed);
    nn_check(failed, errno_nn);
    size_t n = written / sizeof(float);
    if (n == 0)
        cgi_fail("500 Internal Server Error", "the model gave no scores");

    const char *labels_path = cgi_env("LABELS", DEFAULT_LABELS);
    size_t nlabels = init_nlabels;
    char **labels = init_labels;
    if (!init_labels_path || strcmp(labels_path, init_labels_path) != 0)
        labels = load_labels(labels_path, &nlabels);
    static double prob[NCLASSES];
    size_t best[TOPK];
    size_t k = top_k(out, n, TOPK, prob, best);
    printf("Content-Type: application/json\n\n{\"model\":");
    json_string(stdout, model);
    printf(",\"width\":%ld,\"height\":%ld,\"top5\":[", img.width, img.height);
    for (size_t r = 0; r < k; r++) {
        printf("%s{\"class\":%d,\"label\":", r ? "," : "", (int)best[r]);
        if (labels && best[r] < nlabels)
            json_string(stdout, labels[best[r]]);
        else
            fputs("null", stdout);
        printf(",\"p\":%.9g}", prob[best[r]]);
    }
    printf("]}\n");
    return 0;
}
