/*
 * probe -- WASI command for CLI / WASI host tests.
 *
 *   probe args A B ...     print each argument on its own line
 *   probe env NAME         print $NAME or "<unset>"
 *   probe cat PATH         copy a file to stdout
 *   probe write PATH TEXT  write TEXT to PATH
 *   probe stdin            copy stdin to stdout
 *   probe exit N           exit with status N
 *   probe spin             loop forever
 *   probe alloc MB         malloc+touch MB megabytes in 1 MB steps
 *   probe nn-name NAME     wasi-nn load_by_name(NAME); print errno / graph
 *   probe trap             execute an unreachable instruction
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "wasi_nn.h"

static int copy_stream(FILE *in, FILE *out) {
    char buf[8192];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0) {
        if (fwrite(buf, 1, n, out) != n)
            return -1;
    }
    return ferror(in) ? -1 : 0;
}

static void *volatile alloc_sink;

/* One "MB" step: 1 MiB less a little allocator header room. zig's wasm libc
 * malloc rounds large requests (size + header) up to a power of two, so an
 * exact 1 MiB request would consume 2 MiB of linear memory per step; this
 * size makes each step grow memory by exactly 1 MiB (16 pages). */
#define ALLOC_STEP ((1u << 20) - 64u)

static int usage(void) {
    fprintf(stderr,
            "usage: probe args|env NAME|cat PATH|write PATH TEXT|stdin|"
            "exit N|spin|alloc MB|nn-name NAME|trap\n");
    return 2;
}

int main(int argc, char **argv) {
    if (argc < 2)
        return usage();
    const char *cmd = argv[1];

    if (strcmp(cmd, "args") == 0) {
        for (int i = 2; i < argc; i++)
            printf("%s\n", argv[i]);
        return 0;
    }
    if (strcmp(cmd, "env") == 0 && argc == 3) {
        const char *v = getenv(argv[2]);
        printf("%s\n", v ? v : "<unset>");
        return 0;
    }
    if (strcmp(cmd, "cat") == 0 && argc == 3) {
        FILE *f = fopen(argv[2], "rb");
        if (!f) {
            perror(argv[2]);
            return 1;
        }
        int rc = copy_stream(f, stdout);
        fclose(f);
        if (rc != 0) {
            perror(argv[2]);
            return 1;
        }
        return 0;
    }
    if (strcmp(cmd, "write") == 0 && argc == 4) {
        FILE *f = fopen(argv[2], "wb");
        if (!f) {
            perror(argv[2]);
            return 1;
        }
        size_t len = strlen(argv[3]);
        if (fwrite(argv[3], 1, len, f) != len || fclose(f) != 0) {
            perror(argv[2]);
            return 1;
        }
        return 0;
    }
    if (strcmp(cmd, "stdin") == 0) {
        if (copy_stream(stdin, stdout) != 0) {
            perror("stdin");
            return 1;
        }
        return 0;
    }
    if (strcmp(cmd, "exit") == 0 && argc == 3) {
        fflush(stdout);
        exit(atoi(argv[2]));
    }
    if (strcmp(cmd, "spin") == 0) {
        volatile unsigned long counter = 0;
        for (;;)
            counter++;
    }
    if (strcmp(cmd, "alloc") == 0 && argc == 3) {
        int mb = atoi(argv[2]);
        for (int i = 1; i <= mb; i++) {
            char *p = malloc(ALLOC_STEP);
            if (!p) {
                printf("malloc failed at %d MB\n", i);
                fflush(stdout);
                return 3;
            }
            memset(p, (unsigned char)i, ALLOC_STEP);
            alloc_sink = p; /* escape: keeps the compiler from eliding malloc */
            printf("allocated %d MB\n", i);
            fflush(stdout);
        }
        return 0;
    }
    if (strcmp(cmd, "nn-name") == 0 && argc == 3) {
        graph g = 0;
        int32_t err = wasi_nn_load_by_name(argv[2], (uint32_t)strlen(argv[2]),
                                           &g);
        printf("errno %d\n", (int)err);
        if (err == 0)
            printf("graph %u\n", (unsigned)g);
        return 0;
    }
    if (strcmp(cmd, "trap") == 0) {
        fflush(stdout);
        __builtin_trap();
    }
    return usage();
}
