/*
 * embed -- GGML embedding guest (WASI command).
 *
 *   embed [--model NAME] TEXT...
 *
 * Loads NAME with {"embedding":true}, sends TEXT (the words joined by
 * spaces) as input 0, computes, and prints output 0 -- the host's JSON
 * {"n_embedding":N,"embedding":[...]} -- as-is on one line.
 * Exit status: 0; 1 on a wasi-nn error; 2 on bad usage.
 */
#define PROG "embed"
#include "ggml_common.h"

static const char USAGE[] = "embed [--model NAME] TEXT...";

int main(int argc, char **argv) {
    opts_t o;
    parse_opts(argc, argv, 0, USAGE, &o);
    if (o.nwords == 0)
        usage_error("missing TEXT");

    graph_execution_context ctx = ggml_open(o.model, "{\"embedding\":true}");
    set_bytes(ctx, 0, o.words.p, o.words.len);
    nn_check("compute", wasi_nn_compute(ctx));

    buf_t out = {0};
    read_output(ctx, 0, 0, &out);
    while (out.len > 0 && (out.p[out.len - 1] == '\n' ||
                           out.p[out.len - 1] == '\r'))
        out.len--; /* one line: drop a trailing newline the host may add */
    fwrite(out.p, 1, out.len, stdout);
    putchar('\n');
    return 0;
}
