/*
 * image.h -- helpers shared by the ImageNet classifier guests classify and
 * edge_classify: reading a whole stream, binary PPM (P6) parsing, the
 * ImageNet evaluation resize (short side 256, centre crop 224, as
 * examples/classify/prepare.py does with Pillow), normalization to the
 * model's NCHW float input, softmax + top-k, and splitting a labels file.
 *
 * Errors come back as messages (static strings), so that each guest reports
 * them its own way: classify on stderr, edge_classify as a 400 response.
 */
#ifndef IMAGE_H
#define IMAGE_H

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

#define IMG_HELPER static __attribute__((unused))

#define IMG_SIZE 224   /* the classifier's input is 224x224 */
#define IMG_RESIZE 256 /* short side before the centre crop */
#define IMG_MAX_PIXELS (1L << 26) /* 8192x8192: larger images are refused */

static const float IMG_MEAN[3] = {0.485f, 0.456f, 0.406f};
static const float IMG_STD[3] = {0.229f, 0.224f, 0.225f};

/* Read f to its end into a malloc'd buffer; NULL on a read error or OOM.
 * `hint`, the size announced (CGI's CONTENT_LENGTH; 0: unknown): reading
 * stops once that many bytes came. Each read is a host call (tens of us), so
 * with the size known it takes one. */
IMG_HELPER unsigned char *read_all_hinted(FILE *f, size_t hint, size_t *len_out) {
    size_t cap = (hint && hint < ((size_t)1 << 26)) ? hint + 1 : (size_t)1 << 16;
    size_t len = 0;
    unsigned char *buf = malloc(cap);
    if (!buf)
        return NULL;
    for (;;) {
        if (len == cap) {
            cap *= 2;
            unsigned char *nb = realloc(buf, cap);
            if (!nb) {
                free(buf);
                return NULL;
            }
            buf = nb;
        }
        size_t n = fread(buf + len, 1, cap - len, f);
        len += n;
        if (hint && len == hint)
            break; /* all that was announced: no read for the EOF */
        if (n == 0) {
            if (ferror(f)) {
                free(buf);
                return NULL;
            }
            break;
        }
    }
    *len_out = len;
    return buf;
}

IMG_HELPER unsigned char *read_all(FILE *f, size_t *len_out) {
    return read_all_hinted(f, 0, len_out);
}

/* ---- PPM ------------------------------------------------------------- */

typedef struct {
    long width, height;
    const unsigned char *rgb; /* width*height*3 bytes, into the parsed buffer */
} ppm_t;

static int img_is_space(unsigned char c) {
    return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' ||
           c == '\f';
}

/* Skip whitespace and '#' comments (to end of line). */
static void img_skip_ws(const unsigned char *p, size_t len, size_t *pos) {
    while (*pos < len) {
        if (img_is_space(p[*pos])) {
            (*pos)++;
        } else if (p[*pos] == '#') {
            while (*pos < len && p[*pos] != '\n' && p[*pos] != '\r')
                (*pos)++;
        } else {
            break;
        }
    }
}

static int img_read_uint(const unsigned char *p, size_t len, size_t *pos,
                         long *out) {
    img_skip_ws(p, len, pos);
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

/* Parse a binary PPM (P6, maxval 255, comments allowed in the header).
 * Returns NULL, or what is wrong with it. */
IMG_HELPER const char *ppm_parse(const unsigned char *p, size_t len,
                                 ppm_t *img) {
    size_t pos = 2;
    long maxval;
    if (len < 2 || p[0] != 'P' || p[1] != '6')
        return "not a binary PPM (P6)";
    if (img_read_uint(p, len, &pos, &img->width) ||
        img_read_uint(p, len, &pos, &img->height) ||
        img_read_uint(p, len, &pos, &maxval) || pos >= len ||
        !img_is_space(p[pos]))
        return "malformed PPM header";
    pos++; /* exactly one whitespace byte before the raster */
    if (img->width == 0 || img->height == 0)
        return "empty image";
    if (img->width * img->height > IMG_MAX_PIXELS)
        return "image too large (more than 8192x8192 pixels)";
    if (maxval != 255)
        return "maxval is not 255 (only 8-bit PPMs are read)";
    if (len - pos < (size_t)(img->width * img->height * 3))
        return "truncated pixel data";
    img->rgb = p + pos;
    return NULL;
}

/* ---- resize: Pillow's BILINEAR (a triangle filter widened by the scale
 * when downscaling, so it antialiases), one axis at a time, rounding to
 * 8 bits after each pass as Pillow does. -------------------------------- */

/* Resample `n` lines of `in_size` pixels (3 channels, `stride` bytes apart
 * along the axis, lines `line_step` bytes apart) to `out_size` pixels. */
static int img_resample(const unsigned char *in, long in_size,
                        long in_stride, long in_line, unsigned char *out,
                        long out_size, long out_stride, long out_line,
                        long lines) {
    double scale = (double)in_size / (double)out_size;
    double filterscale = scale > 1.0 ? scale : 1.0;
    double support = filterscale; /* bilinear's support is 1 */
    long ksize = (long)ceil(support) * 2 + 1;
    double *k = malloc(sizeof(double) * (size_t)ksize);
    if (!k)
        return -1;
    for (long o = 0; o < out_size; o++) {
        double center = ((double)o + 0.5) * scale;
        long lo = (long)(center - support + 0.5);
        long hi = (long)(center + support + 0.5);
        if (lo < 0)
            lo = 0;
        if (hi > in_size)
            hi = in_size;
        double total = 0.0;
        for (long i = lo; i < hi; i++) {
            double x = fabs(((double)i - center + 0.5) / filterscale);
            k[i - lo] = x < 1.0 ? 1.0 - x : 0.0;
            total += k[i - lo];
        }
        for (long line = 0; line < lines; line++) {
            for (int c = 0; c < 3; c++) {
                double acc = 0.0;
                for (long i = lo; i < hi; i++)
                    acc += k[i - lo] * in[line * in_line + i * in_stride + c];
                double v = total > 0.0 ? floor(acc / total + 0.5) : 0.0;
                out[line * out_line + o * out_stride + c] =
                    (unsigned char)(v < 0 ? 0 : v > 255 ? 255 : v);
            }
        }
    }
    free(k);
    return 0;
}

/* The ImageNet evaluation crop into dst (IMG_SIZE x IMG_SIZE x 3): resize
 * so the short side is IMG_RESIZE (the long side truncated, as torchvision
 * does), then take the centre. An image already IMG_SIZE square is copied
 * as it is (the classify guest's input). Returns NULL or an error. */
IMG_HELPER const char *image_crop(const ppm_t *img, unsigned char *dst) {
    long w = img->width, h = img->height;
    if (w == IMG_SIZE && h == IMG_SIZE) {
        memcpy(dst, img->rgb, (size_t)IMG_SIZE * IMG_SIZE * 3);
        return NULL;
    }
    long nw = w <= h ? IMG_RESIZE : (long)((double)IMG_RESIZE * w / h);
    long nh = w <= h ? (long)((double)IMG_RESIZE * h / w) : IMG_RESIZE;
    if (nw < IMG_SIZE || nh < IMG_SIZE)
        return "image too narrow to crop";
    unsigned char *row = malloc((size_t)nw * h * 3);
    unsigned char *full = malloc((size_t)nw * nh * 3);
    const char *err = NULL;
    if (!row || !full ||
        img_resample(img->rgb, w, 3, w * 3, row, nw, 3, nw * 3, h) ||
        img_resample(row, h, nw * 3, 3, full, nh, nw * 3, 3, nw)) {
        err = "out of memory resizing the image";
    } else {
        /* round half to even, as Python's round() in prepare.py */
        long left = (long)nearbyint((double)(nw - IMG_SIZE) / 2);
        long top = (long)nearbyint((double)(nh - IMG_SIZE) / 2);
        for (long y = 0; y < IMG_SIZE; y++)
            memcpy(dst + (size_t)y * IMG_SIZE * 3,
                   full + ((size_t)(y + top) * nw + (size_t)left) * 3,
                   (size_t)IMG_SIZE * 3);
    }
    free(row);
    free(full);
    return err;
}

/* IMG_SIZE^2 RGB bytes -> the model's input, [1,3,H,W] floats:
 * (pixel / 255 - mean) / std per channel. */
#ifdef __wasm_simd128__
#include <wasm_simd128.h>

/* 16 values of one channel, u8 -> ((x / 255) - mean) / std, the scalar
 * expression lane by lane (IEEE division: the same floats) */
static inline void img_channel16(v128_t x, float mean, float std, float *out) {
    const v128_t k255 = wasm_f32x4_splat(255.0f), m = wasm_f32x4_splat(mean),
                 s = wasm_f32x4_splat(std);
    v128_t lo = wasm_u16x8_extend_low_u8x16(x), hi = wasm_u16x8_extend_high_u8x16(x);
    v128_t q[4] = {wasm_u32x4_extend_low_u16x8(lo), wasm_u32x4_extend_high_u16x8(lo),
                   wasm_u32x4_extend_low_u16x8(hi), wasm_u32x4_extend_high_u16x8(hi)};
    for (int k = 0; k < 4; k++) {
        v128_t v = wasm_f32x4_div(wasm_f32x4_convert_u32x4(q[k]), k255);
        wasm_v128_store(out + 4 * k, wasm_f32x4_div(wasm_f32x4_sub(v, m), s));
    }
}
#endif

IMG_HELPER void image_normalize(const unsigned char *rgb, float *t) {
    const size_t plane = (size_t)IMG_SIZE * IMG_SIZE;
    size_t i = 0;
#ifdef __wasm_simd128__
    /* 16 pixels at a time: their 48 bytes split into R, G and B by shuffles */
    for (; i + 16 <= plane; i += 16) {
        const unsigned char *p = rgb + 3 * i;
        v128_t a = wasm_v128_load(p), b = wasm_v128_load(p + 16), c = wasm_v128_load(p + 32);
        v128_t r = wasm_i8x16_shuffle(a, b, 0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30,
                                      0, 0, 0, 0, 0);
        r = wasm_i8x16_shuffle(r, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 20, 23, 26, 29);
        v128_t g = wasm_i8x16_shuffle(a, b, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31,
                                      0, 0, 0, 0, 0);
        g = wasm_i8x16_shuffle(g, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 21, 24, 27, 30);
        v128_t bl = wasm_i8x16_shuffle(a, b, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29,
                                       0, 0, 0, 0, 0, 0);
        bl = wasm_i8x16_shuffle(bl, c, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 22, 25, 28, 31);
        img_channel16(r, IMG_MEAN[0], IMG_STD[0], t + i);
        img_channel16(g, IMG_MEAN[1], IMG_STD[1], t + plane + i);
        img_channel16(bl, IMG_MEAN[2], IMG_STD[2], t + 2 * plane + i);
    }
#endif
    /* a table per channel: the same float expression, 768 times instead of
     * once a value (a third of a millisecond a request in wasm) */
    float lut[3][256];
    if (i < plane)
        for (int c = 0; c < 3; c++)
            for (int x = 0; x < 256; x++) {
                float v = (float)x / 255.0f;
                lut[c][x] = (v - IMG_MEAN[c]) / IMG_STD[c];
            }
    for (; i < plane; i++) {
        t[i] = lut[0][rgb[i * 3]];
        t[plane + i] = lut[1][rgb[i * 3 + 1]];
        t[2 * plane + i] = lut[2][rgb[i * 3 + 2]];
    }
}

/* ---- inference ------------------------------------------------------- */

/* One run of the classifier on graph g: input, f32 [1,3,IMG_SIZE,IMG_SIZE],
 * to scores (at most max_bytes; *written says how many). Answers 0, or the
 * errno of the wasi-nn call it names in *failed. */
IMG_HELPER int32_t classify_scores(graph g, const float *input, float *scores,
                                   uint32_t max_bytes, uint32_t *written,
                                   const char **failed) {
    static const uint32_t dims[4] = {1, 3, IMG_SIZE, IMG_SIZE};
    const tensor t = {
        .dims = dims,
        .dims_len = 4,
        .type = TENSOR_TYPE_F32,
        .data = (const uint8_t *)input,
        .data_len = (uint32_t)(sizeof(float) * 3 * IMG_SIZE * IMG_SIZE),
    };
    graph_execution_context ctx = 0;
    int32_t err;
    *written = 0;
    if ((err = wasi_nn_init_execution_context(g, &ctx)) != 0)
        *failed = "init_execution_context";
    else if ((err = wasi_nn_set_input(ctx, 0, &t)) != 0)
        *failed = "set_input";
    else if ((err = wasi_nn_compute(ctx)) != 0)
        *failed = "compute";
    else if ((err = wasi_nn_get_output(ctx, 0, (uint8_t *)scores, max_bytes,
                                       written)) != 0)
        *failed = "get_output";
    /* No finalize_execution_context: it is WasmEdge-only (wasmtime's witx
     * has none), and the context goes with the instance. */
    return err;
}

/* ---- scores ---------------------------------------------------------- */

/* Softmax of logits[0..n) in double precision into prob (n entries), then
 * the k best indices into best (ties: lowest index first). Returns how many
 * (min(k, n)). */
IMG_HELPER size_t top_k(const float *logits, size_t n, size_t k, double *prob,
                        size_t *best) {
    double mx = logits[0], sum = 0.0;
    for (size_t i = 1; i < n; i++)
        if (logits[i] > mx)
            mx = logits[i];
    for (size_t i = 0; i < n; i++) {
        prob[i] = exp((double)logits[i] - mx);
        sum += prob[i];
    }
    for (size_t i = 0; i < n; i++)
        prob[i] /= sum;
    if (k > n)
        k = n;
    if (k == 0)
        return 0;
    /* one pass, the best so far kept in order: an equal one never passes an
     * earlier one (ties: lowest index first) */
    size_t have = 0;
    for (size_t i = 0; i < n; i++) {
        if (have == k && !(prob[i] > prob[best[k - 1]]))
            continue;
        size_t at = have < k ? have++ : k - 1;
        while (at > 0 && prob[i] > prob[best[at - 1]]) {
            best[at] = best[at - 1];
            at--;
        }
        best[at] = i;
    }
    return k;
}

/* Split text[0..len) (NUL-terminated at len) into lines in place, trailing
 * \r and \n stripped. Returns a malloc'd array, NULL on OOM. */
IMG_HELPER char **split_lines(char *text, size_t len, size_t *count) {
    size_t n = 0, cap = 1024;
    char **lines = malloc(sizeof(char *) * cap);
    if (!lines)
        return NULL;
    char *s = text;
    while (s < text + len) {
        char *nl = memchr(s, '\n', (size_t)(text + len - s));
        char *e = nl ? nl : text + len;
        while (e > s && (e[-1] == '\r' || e[-1] == '\n'))
            e--;
        *e = '\0';
        if (n == cap) {
            cap *= 2;
            char **more = realloc(lines, sizeof(char *) * cap);
            if (!more) {
                free(lines);
                return NULL;
            }
            lines = more;
        }
        lines[n++] = s;
        if (!nl)
            break;
        s = nl + 1;
    }
    *count = n;
    return lines;
}

#endif /* IMAGE_H */
