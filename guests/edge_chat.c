/*
 * edge_chat -- a GGUF chat model as an HTTP handler (`wasinn serve --route
 * /chat=edge_chat.wasm`).
 *
 *   POST a prompt (the body, UTF-8 text) -> text/plain: the model's reply,
 *   with headers X-Input-Tokens and X-Output-Tokens.
 *
 * One ChatML user turn, as guests/chat.c renders it. Environment: MODEL, the
 * host's name for the model (default smollm2, `wasinn serve`'s default chat
 * model); N_PREDICT, the most tokens to generate (default 128), which the
 * query's n_predict=N may lower; TEMP and SEED, the sampling's (default: the
 * backend's). An empty body: 400; a prompt longer than
 * the context: 413; a wasi-nn error: the guest exits 1 (the server's 500).
 */
#define PROG "edge_chat"
#include "cgi.h"
#include "ggml_common.h"

#define MAX_N_PREDICT 4096

static long long n_predict(void) {
    char *end;
    long long n = strtoll(cgi_env("N_PREDICT", "128"), &end, 10);
    if (*end != '\0' || n < 1 || n > MAX_N_PREDICT)
        die(1, "N_PREDICT: expected an integer in [1, %d]", MAX_N_PREDICT);
    char asked[24];
    if (cgi_query(getenv("QUERY_STRING"), "n_predict", asked, sizeof asked) == 0) {
        long long q = strtoll(asked, &end, 10);
        if (*end != '\0' || q < 1)
            cgi_fail("400 Bad Request", "n_predict: expected a positive integer");
        if (q < n)
            n = q;
    }
    return n;
}

int main(void) {
    g_usage = "POST a prompt; environment MODEL, N_PREDICT, TEMP, SEED";
    buf_t prompt = {0};
    buf_reserve(&prompt, 0);
    char chunk[4096];
    size_t got;
    while ((got = fread(chunk, 1, sizeof chunk, stdin)) > 0)
        buf_append(&prompt, chunk, got);
    if (prompt.len == 0)
        cgi_fail("400 Bad Request", "send the prompt as the request body");

    opts_t o;
    memset(&o, 0, sizeof o);
    o.model = cgi_env("MODEL", "smollm2");
    o.n_predict = n_predict();
    o.given = OPT_N_PREDICT;
    if (getenv("TEMP")) { /* the model's sampling, else the backend's defaults */
        o.temp = parse_num("TEMP", getenv("TEMP"), 0.0, 1000.0);
        o.given |= OPT_TEMP;
    }
    if (getenv("SEED")) {
        o.seed = parse_int("SEED", getenv("SEED"), 0, UINT32_MAX);
        o.given |= OPT_SEED;
    }
    buf_t cfg = {0};
    build_config(&o, &cfg);
    graph_execution_context ctx = ggml_open(o.model, cfg.p);

    buf_t history = {0};
    buf_reserve(&history, 0);
    chatml_user_turn(&history, prompt.p, prompt.len);
    set_bytes(ctx, 0, history.p, history.len);
    if (gen_status("compute", wasi_nn_compute(ctx)) == GEN_PROMPT_TOO_LONG)
        cgi_fail("413 Content Too Large", "the prompt is longer than the "
                 "model's context");
    buf_t reply = {0};
    read_output(ctx, 0, 0, &reply);
    trim_end_marker(&reply);

    buf_t meta = {0};
    unsigned long long in = 0, out = 0;
    read_output(ctx, 1, 0, &meta);
    printf("Content-Type: text/plain; charset=utf-8\n");
    if (json_uint(meta.p, "input_tokens", &in) == 0 &&
        json_uint(meta.p, "output_tokens", &out) == 0)
        printf("X-Input-Tokens: %llu\nX-Output-Tokens: %llu\n", in, out);
    printf("\n");
    fwrite(reply.p, 1, reply.len, stdout);
    return 0;
}
