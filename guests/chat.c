/*
 * chat -- GGML chat guest with a ChatML template (WASI command).
 *
 *   chat [--model NAME] [--n-predict N] [--temp T] [--seed S] [--ctx-size N]
 *        [--system TEXT] [--stream] [PROMPT...]
 *
 * The guest renders the template itself and sends the whole conversation as
 * input 0 on every turn (as WasmEdge/LlamaEdge apps do):
 *
 *   <|im_start|>system\n{system}<|im_end|>\n          (with --system)
 *   <|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n
 *   {reply}<|im_end|>\n                               (appended after a turn)
 *
 * With PROMPT words: one turn, print the reply and a newline, exit. Otherwise
 * each line of stdin is a user turn (empty lines are skipped) until EOF, and
 * each reply is printed on its own line. --stream prints the pieces as they
 * arrive (compute_single/get_output_single) instead of compute + get_output.
 * After each reply "[input_tokens=N output_tokens=M]" (from output 1) goes to
 * stderr. A trailing "<|im_end|>" the model emits literally is trimmed.
 * Exit status: 0; 1 on a wasi-nn error or prompt_too_long; 2 on bad usage.
 */
#define PROG "chat"
#include "ggml_common.h"

static const char USAGE[] =
    "chat [--model NAME] [--n-predict N] [--temp T] [--seed S] "
    "[--ctx-size N] [--system TEXT] [--stream] [PROMPT...]";

/* compute + get_output(0); prints the reply (without newline). */
static gen_t compute_reply(graph_execution_context ctx, buf_t *reply) {
    gen_t st = gen_status("compute", wasi_nn_compute(ctx));
    if (st == GEN_PROMPT_TOO_LONG)
        return st;
    read_output(ctx, 0, 0, reply);
    trim_end_marker(reply);
    fwrite(reply->p, 1, reply->len, stdout);
    return st;
}

/*
 * compute_single + get_output_single(0) until the generation ends, printing
 * each piece as it arrives. Text that may be the start of a trailing
 * "<|im_end|>" is held back until it is known not to be one.
 */
static gen_t stream_reply(graph_execution_context ctx, buf_t *reply) {
    buf_t piece = {0};
    size_t printed = 0;
    gen_t st;
    reply->len = 0;
    buf_reserve(reply, 0);
    while ((st = gen_status("compute_single", wasi_nn_compute_single(ctx))) ==
           GEN_MORE) {
        read_output(ctx, 0, 1, &piece);
        buf_append(reply, piece.p, piece.len);
        size_t upto = reply->len - end_tail(reply->p, reply->len, 0);
        if (upto > printed) {
            fwrite(reply->p + printed, 1, upto - printed, stdout);
            fflush(stdout);
            printed = upto;
        }
    }
    free(piece.p);
    trim_end_marker(reply);
    if (reply->len > printed)
        fwrite(reply->p + printed, 1, reply->len - printed, stdout);
    return st;
}

/* One user turn: extend the history, generate, print, record the reply. */
static void chat_turn(graph_execution_context ctx, const opts_t *o,
                      buf_t *history, const char *user, size_t user_len) {
    chatml_user_turn(history, user, user_len);
    set_bytes(ctx, 0, history->p, history->len);

    buf_t reply = {0};
    gen_t st =
        o->stream ? stream_reply(ctx, &reply) : compute_reply(ctx, &reply);
    if (st == GEN_PROMPT_TOO_LONG) {
        if (o->stream)
            nn_check("fini_single", wasi_nn_fini_single(ctx));
        exit(1);
    }
    putchar('\n');
    fflush(stdout);
    print_token_stats(ctx); /* before fini_single, which clears the counts */
    if (o->stream)
        nn_check("fini_single", wasi_nn_fini_single(ctx));

    buf_append(history, reply.p, reply.len);
    buf_puts(history, "<|im_end|>\n");
    free(reply.p);
}

int main(int argc, char **argv) {
    opts_t o;
    parse_opts(argc, argv,
               OPT_N_PREDICT | OPT_TEMP | OPT_SEED | OPT_CTX_SIZE |
                   OPT_SYSTEM | OPT_STREAM,
               USAGE, &o);

    buf_t cfg = {0};
    build_config(&o, &cfg);
    graph_execution_context ctx = ggml_open(o.model, cfg.p);

    buf_t history = {0};
    buf_reserve(&history, 0);
    if (o.system) {
        buf_puts(&history, "<|im_start|>system\n");
        buf_puts(&history, o.system);
        buf_puts(&history, "<|im_end|>\n");
    }

    if (o.nwords > 0) {
        chat_turn(ctx, &o, &history, o.words.p, o.words.len);
        return 0;
    }

    char *line = NULL;
    size_t line_cap = 0;
    ssize_t n;
    while ((n = getline(&line, &line_cap, stdin)) >= 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            n--;
        if (n > 0)
            chat_turn(ctx, &o, &history, line, (size_t)n);
    }
    free(line);
    return 0;
}
