/*
 * edge_test -- a test handler for `wasinn serve --route`: its behaviour is
 * the request's PATH_INFO (the path after the route).
 *
 *   /echo      200 text/plain: the CGI variables the tests check, a counter
 *              of requests this instance served (always 1: each request
 *              gets a fresh instance), and the body
 *   /cat       ?file=NAME: the file /data/NAME (404 without it)
 *   /status    404 with a body, set with a Status header
 *   /redirect  a Location header alone (302)
 *   /bad       no blank line after the headers' first line: malformed
 *   /trap      traps (unreachable)
 *   /exit      "edge_test: failing on purpose" on stderr, exit status 3;
 *              ?noise=N writes N KiB to stderr before it
 *   /loop      loops forever (until the deadline)
 *   /grow      allocates ?mb=N MiB and touches it; traps if it cannot
 */
#include <stdint.h>

#include "cgi.h"

static int served; /* a global: a reused instance would count past 1 */

static void show(const char *name) {
    const char *v = getenv(name);
    printf("%s=%s\n", name, v ? v : "(unset)");
}

int main(void) {
    const char *path = cgi_env("PATH_INFO", "");
    served++;
    if (strcmp(path, "/echo") == 0) {
        printf("Content-Type: text/plain\nX-Served: %d\n\n", served);
        static const char *names[] = {
            "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
            "CONTENT_TYPE", "CONTENT_LENGTH", "SERVER_NAME", "SERVER_PORT",
            "SERVER_PROTOCOL", "GATEWAY_INTERFACE", "REMOTE_ADDR",
            "HTTP_X_REQUEST_ID", "X_MATCHED_ROUTE", "GREETING"};
        for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
            show(names[i]);
        printf("served=%d\nbody=", served);
        char chunk[4096];
        size_t got;
        while ((got = fread(chunk, 1, sizeof chunk, stdin)) > 0)
            fwrite(chunk, 1, got, stdout);
        return 0;
    }
    if (strcmp(path, "/cat") == 0) { /* a file of the preopened /data */
        char name[64] = "", full[96];
        cgi_query(getenv("QUERY_STRING"), "file", name, sizeof name);
        snprintf(full, sizeof full, "/data/%s", name);
        FILE *f = fopen(full, "rb");
        if (!f) {
            printf("Status: 404 Not Found\nContent-Type: text/plain\n\nno %s\n", full);
            return 0;
        }
        printf("Content-Type: text/plain\n\n");
        char chunk[4096];
        size_t got;
        while ((got = fread(chunk, 1, sizeof chunk, f)) > 0)
            fwrite(chunk, 1, got, stdout);
        fclose(f);
        return 0;
    }
    if (strcmp(path, "/status") == 0) {
        printf("Status: 404 Not Found\nContent-Type: text/plain\n\nno such thing\n");
        return 0;
    }
    if (strcmp(path, "/redirect") == 0) {
        printf("Location: /elsewhere\n\n");
        return 0;
    }
    if (strcmp(path, "/bad") == 0) {
        printf("this is not a header\n\nbody\n");
        return 0;
    }
    if (strcmp(path, "/trap") == 0)
        __builtin_trap();
    if (strcmp(path, "/exit") == 0) {
        char kib[16] = "0";
        cgi_query(getenv("QUERY_STRING"), "noise", kib, sizeof kib);
        for (int i = 0; i < atoi(kib) * 16; i++) /* 64-byte lines of noise first */
            fprintf(stderr, "edge_test: noise %045d\n", i);
        fprintf(stderr, "edge_test: failing on purpose\n");
        return 3;
    }
    if (strcmp(path, "/loop") == 0) {
        for (volatile uint64_t i = 0;; i++) {
        }
    }
    if (strcmp(path, "/grow") == 0) {
        char mb[16] = "1";
        cgi_query(getenv("QUERY_STRING"), "mb", mb, sizeof mb);
        size_t size = (size_t)atoi(mb) << 20;
        volatile char *p = malloc(size);
        if (!p)
            __builtin_trap();
        for (size_t i = 0; i < size; i += 4096)
            p[i] = 1;
        printf("Content-Type: text/plain\n\ngrew %s MiB\n", mb);
        return 0;
    }
    cgi_fail("404 Not Found", "edge_test has no %s", path);
}
