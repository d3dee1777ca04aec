/*
 * preinit.h -- make a WASI command pre-initializable (wasinn preinit, Wizer).
 *
 *   static void init(void) { ... expensive set-up ... }
 *   PREINIT(init)
 *   int main(int argc, char **argv) { preinit_ensure(); ... }
 *
 * main must take (argc, argv): with `int main(void)` this header's module
 * traps at start (measured with the ziglang 0.17 wheel's wasi-libc).
 *
 * The pattern is Wizer's own (wizer.h): `wizer.initialize` runs the C
 * constructors and then `init`; the snapshot keeps the memory they leave.
 * `wizer.resume` becomes the snapshot's `_start` (wasinn preinit renames it,
 * as `wizer -r _start=wizer.resume` does): it re-reads the environment, runs
 * main WITHOUT the constructors (they already ran), then the destructors.
 * Run without pre-initialization, the module is an ordinary command: crt1's
 * `_start` runs the constructors and main, and preinit_ensure() runs init
 * there, once. `preinit_warm` says which happened.
 *
 * wasi-nn in init: load graphs by name only (load_by_name,
 * load_by_name_with_config); keep the handles in globals. Execution contexts
 * and `load` from bytes live in the host and are refused; make them in main.
 */
#ifndef WASINN_PREINIT_H
#define WASINN_PREINIT_H

#include <wasi/api.h>
#include <wasi/libc-environ.h>

extern void __wasm_call_ctors(void);
extern void __wasm_call_dtors(void);
extern int __main_void(void);

/* 1 when this instance started from a snapshot taken after init. */
static int preinit_warm;
static int preinit_done;

/* PREINIT(init) defines the two exports and preinit_ensure(), which runs init
 * unless it already ran (in this instance, or before the snapshot). */
#define PREINIT(init_func)                                                   \
    static void preinit_ensure(void) {                                       \
        if (!preinit_done) {                                                 \
            preinit_done = 1;                                                \
            init_func();                                                     \
        }                                                                    \
    }                                                                        \
    __attribute__((export_name("wizer.initialize"))) void                    \
    preinit_initialize(void) {                                               \
        __wasm_call_ctors();                                                 \
        preinit_ensure();                                                    \
        preinit_warm = 1;                                                    \
    }                                                                        \
    __attribute__((export_name("wizer.resume"))) void preinit_resume(void) { \
        __wasilibc_initialize_environ();                                     \
        int r = __main_void();                                               \
        __wasm_call_dtors();                                                 \
        if (r != 0)                                                          \
            __wasi_proc_exit(r);                                             \
    }

#endif /* WASINN_PREINIT_H */
