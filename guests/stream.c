/*
 * stream -- GGML streaming guest (WASI command).
 *
 *   stream [--model NAME] [--n-predict N] [--temp T] [--seed S] PROMPT...
 *
 * Sends PROMPT (the words joined by spaces, no chat template) as input 0 and
 * prints each token piece as it arrives (compute_single + get_output_single,
 * until end_of_sequence), then a newline; "[pieces=K]" goes to stderr.
 * Exit status: 0; 1 on a wasi-nn error or prompt_too_long; 2 on bad usage.
 */
#define PROG "stream"
#include "ggml_common.h"

static const char USAGE[] =
    "stream [--model NAME] [--n-predict N] [--temp T] [--seed S] PROMPT...";

int main(int argc, char **argv) {
    opts_t o;
    parse_opts(argc, argv, OPT_N_PREDICT | OPT_TEMP | OPT_SEED, USAGE, &o);
    if (o.nwords == 0)
        usage_error("missing PROMPT");

    buf_t cfg = {0};
    build_config(&o, &cfg);
    graph_execution_context ctx = ggml_open(o.model, cfg.p);
    set_bytes(ctx, 0, o.words.p, o.words.len);

    buf_t piece = {0};
    unsigned long pieces = 0;
    gen_t st;
    while ((st = gen_status("compute_single", wasi_nn_compute_single(ctx))) ==
           GEN_MORE) {
        read_output(ctx, 0, 1, &piece);
        fwrite(piece.p, 1, piece.len, stdout);
        fflush(stdout);
        pieces++;
    }
    nn_check("fini_single", wasi_nn_fini_single(ctx));
    putchar('\n');
    fflush(stdout);
    fprintf(stderr, "[pieces=%lu]\n", pieces);
    return st == GEN_PROMPT_TOO_LONG ? 1 : 0;
}
