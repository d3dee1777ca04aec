/*
 * cgi.h -- helpers for guests served as HTTP handlers (`wasinn serve
 * --route`, WAGI-style): the request body is stdin, its method, path, query
 * and headers are CGI environment variables, and the answer is CGI headers,
 * a blank line and the body on stdout.
 */
#ifndef CGI_H
#define CGI_H

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CGI_HELPER static __attribute__((unused))

/* getenv with a default for unset or empty variables. */
CGI_HELPER const char *cgi_env(const char *name, const char *fallback) {
    const char *v = getenv(name);
    return v && *v ? v : fallback;
}

/* Answer `status` (e.g. "400 Bad Request") with a one-line text/plain
 * reason, and end the guest: a handled error is still a clean exit. */
__attribute__((noreturn, format(printf, 2, 3))) CGI_HELPER void
cgi_fail(const char *status, const char *fmt, ...) {
    va_list ap;
    printf("Status: %s\nContent-Type: text/plain; charset=utf-8\n\n", status);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
    exit(0);
}

/* The value of `key` in a query string "a=1&b=2" (not URL-decoded), copied
 * into out (size n); 0 if present. */
CGI_HELPER int cgi_query(const char *query, const char *key, char *out,
                         size_t n) {
    size_t klen = strlen(key);
    for (const char *s = query; s && *s;) {
        if (strncmp(s, key, klen) == 0 && s[klen] == '=') {
            const char *v = s + klen + 1;
            size_t len = strcspn(v, "&");
            if (len >= n)
                len = n - 1;
            memcpy(out, v, len);
            out[len] = '\0';
            return 0;
        }
        s = strchr(s, '&');
        if (s)
            s++;
    }
    return -1;
}

/* s as a JSON string literal, quotes included. */
CGI_HELPER void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\')
            fprintf(f, "\\%c", c);
        else if (c < 0x20)
            fprintf(f, "\\u%04x", c);
        else
            fputc(c, f);
    }
    fputc('"', f);
}

#endif /* CGI_H */
