/*
 * The repeat path of set_input and get_output, in C.
 *
 * After a large inference the CPU caches are cold, and the Python glue of one set_input +
 * get_output (a few ctypes calls, struct unpacking, numpy views) costs ~100 us there: more
 * than the 3% a guest's inference loop may add. A guest's loop repeats the same calls, so the
 * Python handlers, after one checked call, register what they did:
 *   - set_input: this (store, context, index) takes exactly these dims, type and byte length
 *     into this host buffer (an array the backend keeps as its input);
 *   - get_output: this (store, context, index) answers these bytes (an array Python keeps
 *     alive until the next compute). An output whose arrays every compute rewrites is
 *     registered at the context's first set_input, armed: served only once fp_compute has
 *     seen that context compute.
 *   - init_execution_context: a store's first context may be one made for an earlier store
 *     and kept ready (Python's ReadyContext), reserved with its inputs' and outputs'
 *     registrations, pending: the first init of the reserved graph claims it here (handle 0)
 *     and the registrations start being served; an input only counts as set once served.
 *     Python settles the reservation at its next call for that store: it adopts the
 *     context, or, unclaimed, drops it.
 * A call that matches a registration exactly, with every pointer inside guest memory, is served
 * here; anything else (a new shape, a bad handle, a buffer too small, an unknown store) goes to
 * the Python handler, which answers errnos and messages. So this file only copies bytes between
 * bounds-checked guest ranges and registered host ranges; Python drops a registration before
 * the host range it names can go away. Every other wasi-nn function goes to Python through
 * `fp_call`, which unpacks the arguments here (cheaper than in Python, after a cold cache).
 */
#define _GNU_SOURCE /* memfd_create, F_ADD_SEALS; nanosleep with -std=c11 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_DIMS 32
#define MAX_ENTRIES 256
#define KIND_INPUT 1
#define KIND_OUTPUT 2
#define KIND_RESERVED 3 /* a ready context for (store, ctx 0), of the graph `index` */

/* wasmtime's C API, reached through pointers Python hands over (no header, no link step) */
typedef void *(*caller_context_fn)(void *caller);
typedef bool (*caller_export_get_fn)(void *caller, const char *name, size_t len, void *item);
typedef uint8_t *(*memory_data_fn)(void *context, const void *memory);
typedef size_t (*memory_data_size_fn)(void *context, const void *memory);
/* The Python handler of a wasi-nn function: (caller, store context, up to 8 u32
 * arguments, the rest 0) -> errno. Unpacking here spares Python three ctypes calls. */
typedef int32_t (*handler_fn)(void *caller, void *context, uint32_t, uint32_t, uint32_t,
                              uint32_t, uint32_t, uint32_t, uint32_t, uint32_t);
#define MAX_ARGS 8

typedef struct {
    uint64_t store;  /* the store context's address; 0: free slot */
    uint64_t store_id; /* wasmtime's id of that store: never reused, unlike an address */
    uint32_t ctx, index, kind;
    uint32_t dims_len, type, len;
    uint32_t computed; /* output: its context has computed since (else never served);
                        * reserved: claimed */
    uint32_t pending;  /* part of a reservation not claimed yet: never served */
    uint32_t set;      /* input: the guest has set it (a pending one: not yet) */
    uint32_t dims[MAX_DIMS];
    uint8_t *host;   /* input: where the bytes go; output: where they come from */
} entry;

typedef struct {
    atomic_flag lock;
    atomic_int refs;
    caller_context_fn caller_context;
    caller_export_get_fn caller_export_get;
    memory_data_fn memory_data;
    memory_data_size_fn memory_data_size;
    size_t extern_size, extern_of, memory_kind;
    uint64_t hits, misses;
    entry entries[MAX_ENTRIES];
} table;

/* one per defined function: its table and the Python handler that serves misses */
typedef struct {
    table *t;
    handler_fn handler;
    void *handler_id;
    void (*finalize)(void *handler_id); /* Python's: the handler may go */
} func_env;

static void lock(table *t) {
    while (atomic_flag_test_and_set_explicit(&t->lock, memory_order_acquire)) {
    }
}

static void unlock(table *t) { atomic_flag_clear_explicit(&t->lock, memory_order_release); }

table *fp_new(void *caller_context, void *caller_export_get, void *memory_data,
              void *memory_data_size, size_t extern_size, size_t extern_of,
              size_t memory_kind) {
    if (extern_size > 64 || extern_of >= extern_size)
        return NULL;
    table *t = calloc(1, sizeof(table));
    if (t == NULL)
        return NULL;
    atomic_flag_clear(&t->lock);
    atomic_init(&t->refs, 1);
    t->caller_context = (caller_context_fn)caller_context;
    t->caller_export_get = (caller_export_get_fn)caller_export_get;
    t->memory_data = (memory_data_fn)memory_data;
    t->memory_data_size = (memory_data_size_fn)memory_data_size;
    t->extern_size = extern_size;
    t->extern_of = extern_of;
    t->memory_kind = memory_kind;
    return t;
}

void fp_release(table *t) {
    if (t != NULL && atomic_fetch_sub(&t->refs, 1) == 1)
        free(t);
}

func_env *fp_func_env(table *t, void *handler, void *handler_id, void *finalize) {
    func_env *f = malloc(sizeof(func_env));
    if (f == NULL)
        return NULL;
    atomic_fetch_add(&t->refs, 1);
    f->t = t;
    f->handler = (handler_fn)handler;
    f->handler_id = handler_id;
    f->finalize = (void (*)(void *))finalize;
    return f;
}

/* wasmtime's finalizer for a function's env: the linker that held the function is gone */
void fp_func_env_free(void *env) {
    func_env *f = env;
    if (f->finalize != NULL)
        f->finalize(f->handler_id);
    fp_release(f->t);
    free(f);
}

static entry *find(table *t, uint64_t store, uint32_t ctx, uint32_t index, uint32_t kind) {
    for (size_t i = 0; i < MAX_ENTRIES; i++) {
        entry *e = &t->entries[i];
        if (e->store == store && e->ctx == ctx && e->index == index && e->kind == kind)
            return e;
    }
    return NULL;
}

static int put(table *t, uint64_t store, uint64_t store_id, uint32_t ctx, uint32_t index,
               uint32_t kind, uint32_t dims_len, const uint32_t *dims, uint32_t type,
               uint32_t len, uint8_t *host, uint32_t computed) {
    if (store == 0 || dims_len > MAX_DIMS)
        return 0;
    lock(t);
    entry *e = find(t, store, ctx, index, kind);
    if (e == NULL)
        e = find(t, 0, 0, 0, 0);
    if (e != NULL) {
        e->store = store;
        e->store_id = store_id;
        e->ctx = ctx;
        e->index = index;
        e->kind = kind;
        e->dims_len = dims_len;
        if (dims_len)
            memcpy(e->dims, dims, dims_len * sizeof(uint32_t));
        e->type = type;
        e->len = len;
        e->host = host;
        e->computed = computed;
        e->pending = 0;
        e->set = 1;
    }
    unlock(t);
    return e != NULL;
}

int fp_put_input(table *t, uint64_t store, uint64_t store_id, uint32_t ctx, uint32_t index,
                 uint32_t dims_len, const uint32_t *dims, uint32_t type, uint32_t len,
                 uint8_t *host) {
    return put(t, store, store_id, ctx, index, KIND_INPUT, dims_len, dims, type, len, host, 1);
}

/* `computed` 0: an output armed before its context's first compute (the array holds what
 * another request computed): served only after fp_compute sees a compute succeed */
int fp_put_output(table *t, uint64_t store, uint64_t store_id, uint32_t ctx, uint32_t index,
                  uint32_t len, uint8_t *host, uint32_t computed) {
    return put(t, store, store_id, ctx, index, KIND_OUTPUT, 0, NULL, 0, len, host, computed);
}

/* Drop registrations: of one store (ctx < 0), one context (kind 0), or one kind in it;
 * index < 0 matches every index. */
void fp_drop(table *t, uint64_t store, int64_t ctx, uint32_t kind, int64_t index) {
    lock(t);
    for (size_t i = 0; i < MAX_ENTRIES; i++) {
        entry *e = &t->entries[i];
        if (e->store == store && (ctx < 0 || e->ctx == (uint32_t)ctx) &&
            (kind == 0 || e->kind == kind) && (index < 0 || e->index == (uint32_t)index))
            memset(e, 0, sizeof(entry));
    }
    unlock(t);
}

/* what a ready context's registrations take, as Python's ReadyContext lays them out */
typedef struct {
    uint32_t index, type, len, dims_len;
    uint32_t dims[MAX_DIMS];
    uint8_t *host;
} ready_input;

typedef struct {
    uint32_t index, len;
    uint8_t *host;
} ready_output;

/* Reserve a ready context for the store's first init_execution_context of `graph`: its
 * inputs and outputs registered for context 0, pending until claimed. 0 if the table has
 * no room (nothing is registered then). */
int fp_reserve(table *t, uint64_t store, uint32_t graph, const ready_input *in, size_t n_in,
               const ready_output *out, size_t n_out) {
    if (store == 0 || n_in + n_out + 1 > MAX_ENTRIES)
        return 0;
    for (size_t i = 0; i < n_in; i++)
        if (in[i].dims_len > MAX_DIMS)
            return 0;
    entry *slots[MAX_ENTRIES];
    size_t need = n_in + n_out + 1, found = 0;
    lock(t);
    for (size_t i = 0; i < MAX_ENTRIES && found < need; i++)
        if (t->entries[i].store == 0)
            slots[found++] = &t->entries[i];
    if (found == need) {
        for (size_t i = 0; i < need; i++) {
            entry *e = slots[i];
            memset(e, 0, sizeof(entry));
            e->store = store;
            e->pending = 1;
            if (i < n_in) {
                const ready_input *r = &in[i];
                e->kind = KIND_INPUT;
                e->index = r->index;
                e->type = r->type;
                e->len = r->len;
                e->dims_len = r->dims_len;
                memcpy(e->dims, r->dims, r->dims_len * sizeof(uint32_t));
                e->host = r->host;
            } else if (i < n_in + n_out) {
                const ready_output *r = &out[i - n_in];
                e->kind = KIND_OUTPUT;
                e->index = r->index;
                e->len = r->len;
                e->host = r->host;
            } else {
                e->kind = KIND_RESERVED;
                e->index = graph;
            }
        }
    }
    unlock(t);
    return found == need;
}

/* Python's next call for a reserving store: 1 if the reservation was claimed (with the
 * store's id and a bit per input index < 64 the guest has set), 0 if not (its registrations
 * are dropped: the store has no others yet), -1 if there was none. */
int fp_settle(table *t, uint64_t store, uint64_t *store_id, uint64_t *set_mask) {
    int state = -1;
    *store_id = 0;
    *set_mask = 0;
    lock(t);
    for (size_t i = 0; i < MAX_ENTRIES; i++) {
        entry *e = &t->entries[i];
        if (e->store == store && e->kind == KIND_RESERVED) {
            state = e->computed ? 1 : 0;
            *store_id = e->store_id;
        }
    }
    for (size_t i = 0; i < MAX_ENTRIES && state >= 0; i++) {
        entry *e = &t->entries[i];
        if (e->store != store)
            continue;
        if (state == 0 || e->kind == KIND_RESERVED)
            memset(e, 0, sizeof(entry));
        else if (e->kind == KIND_INPUT && e->ctx == 0 && e->set && e->index < 64)
            *set_mask |= (uint64_t)1 << e->index;
    }
    unlock(t);
    return state;
}

void fp_stats(table *t, uint64_t *hits, uint64_t *misses, uint64_t *entries) {
    lock(t);
    *hits = t->hits;
    *misses = t->misses;
    *entries = 0;
    for (size_t i = 0; i < MAX_ENTRIES; i++)
        *entries += t->entries[i].store != 0;
    unlock(t);
}

typedef struct {
    uint8_t *base;
    uint64_t size;
    uint64_t store_id;
} memory;

static bool caller_memory(table *t, void *caller, void *context, memory *out) {
    _Alignas(16) uint8_t item[64];
    memset(item, 0, sizeof(item));
    if (!t->caller_export_get(caller, "memory", 6, item) || item[0] != t->memory_kind)
        return false;
    memcpy(&out->store_id, item + t->extern_of, sizeof out->store_id); /* its first field */
    out->base = t->memory_data(context, item + t->extern_of);
    out->size = t->memory_data_size(context, item + t->extern_of);
    return out->base != NULL;
}

static bool inside(const memory *m, uint64_t ptr, uint64_t len) {
    return ptr <= m->size && len <= m->size - ptr;
}

static uint32_t arg(const void *args, size_t i) {
    uint32_t v; /* wasmtime_val_raw_t is 16 bytes; an i32 sits in its first four */
    memcpy(&v, (const uint8_t *)args + 16 * i, sizeof v);
    return v;
}

static void *hit(table *t, void *args) {
    int32_t zero = 0;
    memcpy(args, &zero, sizeof zero);
    lock(t);
    t->hits++;
    unlock(t);
    return NULL;
}

/* Python answers: the arguments as u32, the errno into the first slot. */
static void *call_python(func_env *f, void *caller, void *context, void *args, size_t nargs) {
    uint32_t a[MAX_ARGS] = {0};
    for (size_t i = 0; i < nargs && i < MAX_ARGS; i++)
        a[i] = arg(args, i);
    if (context == NULL)
        context = f->t->caller_context(caller);
    int32_t errno_ = f->handler(caller, context, a[0], a[1], a[2], a[3], a[4], a[5], a[6],
                                a[7]);
    memcpy(args, &errno_, sizeof errno_);
    return NULL; /* never a trap: a guest's mistake is an errno */
}

static void *miss(func_env *f, void *caller, void *context, void *args, size_t nargs) {
    lock(f->t);
    f->t->misses++;
    unlock(f->t);
    return call_python(f, caller, context, args, nargs);
}

/* The calling store's context and memory, for a handler taking `need` arguments; false: the
 * call goes to Python (`context` is set either way) */
static bool entered(table *t, void *caller, size_t nargs, size_t need, void **context,
                    memory *m) {
    *context = t->caller_context(caller);
    return nargs >= need && *context != NULL && caller_memory(t, caller, *context, m);
}

/* every other wasi-nn function: straight to Python */
void *fp_call(void *env, void *caller, void *args, size_t nargs) {
    return call_python(env, caller, NULL, args, nargs);
}

/* compute(ctx) -> errno: Python computes; once it succeeds, the context's armed outputs may
 * be served (Python's own follow-up after an inference cost ~0.1 ms with cold caches) */
void *fp_compute(void *env, void *caller, void *args, size_t nargs) {
    func_env *f = env;
    table *t = f->t;
    void *context = t->caller_context(caller);
    uint32_t ctx = nargs ? arg(args, 0) : 0;
    call_python(f, caller, context, args, nargs);
    int32_t errno_;
    memcpy(&errno_, args, sizeof errno_);
    if (errno_ != 0 || context == NULL || nargs == 0)
        return NULL;
    lock(t);
    for (size_t i = 0; i < MAX_ENTRIES; i++) {
        entry *e = &t->entries[i];
        if (e->store == (uint64_t)(uintptr_t)context && e->ctx == ctx && e->kind == KIND_OUTPUT)
            e->computed = 1;
    }
    unlock(t);
    return NULL;
}

/* set_input(ctx, index, tensor_ptr) -> errno */
void *fp_set_input(void *env, void *caller, void *args, size_t nargs) {
    func_env *f = env;
    table *t = f->t;
    void *context;
    memory m;
    if (!entered(t, caller, nargs, 3, &context, &m) || !inside(&m, arg(args, 2), 20))
        return miss(f, caller, context, args, nargs);
    uint32_t ctx = arg(args, 0), index = arg(args, 1), tensor_ptr = arg(args, 2);
    uint32_t header[5]; /* dims_ptr, dims_len, type (low byte), data_ptr, data_len */
    memcpy(header, m.base + tensor_ptr, sizeof header);
    uint32_t dims_ptr = header[0], dims_len = header[1], type = header[2] & 0xff;
    uint32_t data_ptr = header[3], data_len = header[4];
    if (dims_len > MAX_DIMS || !inside(&m, dims_ptr, (uint64_t)dims_len * 4) ||
        !inside(&m, data_ptr, data_len))
        return miss(f, caller, context, args, nargs);
    bool served = false;
    lock(t);
    entry *e = find(t, (uint64_t)(uintptr_t)context, ctx, index, KIND_INPUT);
    if (e != NULL && !e->pending && e->store_id == m.store_id && e->dims_len == dims_len &&
        e->type == type && e->len == data_len &&
        memcmp(e->dims, m.base + dims_ptr, (size_t)dims_len * 4) == 0) {
        /* under the lock: Python drops the entry (taking the lock) before the buffer goes */
        memcpy(e->host, m.base + data_ptr, data_len);
        e->set = 1;
        served = true;
    }
    unlock(t);
    return served ? hit(t, args) : miss(f, caller, context, args, nargs);
}

/* init_execution_context(graph, ctx_out) -> errno: a reserved ready context claimed as
 * handle 0 (the store's first context: Python settles the reservation before any call of
 * its own), its pending registrations now served, with this store's id */
void *fp_init_execution_context(void *env, void *caller, void *args, size_t nargs) {
    func_env *f = env;
    table *t = f->t;
    void *context;
    memory m;
    if (!entered(t, caller, nargs, 2, &context, &m) || !inside(&m, arg(args, 1), 4))
        return miss(f, caller, context, args, nargs);
    uint32_t graph = arg(args, 0), ctx_out = arg(args, 1);
    uint64_t store = (uint64_t)(uintptr_t)context;
    bool served = false;
    lock(t);
    entry *r = find(t, store, 0, graph, KIND_RESERVED);
    if (r != NULL && !r->computed) {
        for (size_t i = 0; i < MAX_ENTRIES; i++) {
            entry *e = &t->entries[i];
            if (e->store == store && e->pending) {
                e->pending = 0;
                e->store_id = m.store_id;
            }
        }
        r->computed = 1;
        memset(m.base + ctx_out, 0, 4); /* handle 0 */
        served = true;
    }
    unlock(t);
    return served ? hit(t, args) : miss(f, caller, context, args, nargs);
}

/* get_output(ctx, index, out_ptr, out_max, written_ptr) -> errno */
void *fp_get_output(void *env, void *caller, void *args, size_t nargs) {
    func_env *f = env;
    table *t = f->t;
    void *context;
    memory m;
    if (!entered(t, caller, nargs, 5, &context, &m) || !inside(&m, arg(args, 4), 4))
        return miss(f, caller, context, args, nargs);
    uint32_t ctx = arg(args, 0), index = arg(args, 1), out_ptr = arg(args, 2);
    uint32_t out_max = arg(args, 3), written_ptr = arg(args, 4);
    bool served = false;
    lock(t);
    entry *e = find(t, (uint64_t)(uintptr_t)context, ctx, index, KIND_OUTPUT);
    if (e != NULL && !e->pending && e->store_id == m.store_id && e->computed &&
        e->len <= out_max &&
        inside(&m, out_ptr, e->len)) {
        memcpy(m.base + out_ptr, e->host, e->len);
        memcpy(m.base + written_ptr, &e->len, 4);
        served = true;
    }
    unlock(t);
    return served ? hit(t, args) : miss(f, caller, context, args, nargs);
}

/*
 * A route request's WASI in one call: argv, environment, the body as stdin, preopened
 * directories, and stdout and stderr as sealed in-memory files (see the Python
 * _FileCapture: the same steps, which cost ~0.15 ms in Python after an inference's cold
 * caches), set on the store. Any failure undoes what was made and answers non-zero: Python
 * then does the same the slow way, and reports what fails.
 */
typedef struct {
    size_t size;
    const uint8_t *data;
} byte_vec;

typedef struct {
    void *(*config_new)(void);
    void (*config_delete)(void *config);
    bool (*set_argv)(void *config, size_t argc, const char **argv);
    bool (*set_env)(void *config, size_t envc, const char **names, const char **values);
    void (*byte_vec_new)(byte_vec *out, size_t size, const uint8_t *data);
    void (*set_stdin_bytes)(void *config, byte_vec *bytes);
    bool (*set_stdout_file)(void *config, const char *path);
    bool (*set_stderr_file)(void *config, const char *path);
    bool (*preopen_dir)(void *config, const char *host, const char *guest, bool mutable_);
    void *(*context_set_wasi)(void *context, void *config); /* an error, or NULL */
    void (*error_delete)(void *error);
} wasi_api;

#define WASI_API_FUNCS 11

wasi_api *fp_wasi_api_new(void *const *funcs, size_t n) {
    if (n != WASI_API_FUNCS)
        return NULL;
    for (size_t i = 0; i < n; i++)
        if (funcs[i] == NULL)
            return NULL;
    wasi_api *api = malloc(sizeof(wasi_api));
    if (api != NULL)
        memcpy(api, funcs, sizeof(wasi_api)); /* the same order, all function pointers */
    return api;
}

void fp_wasi_api_free(wasi_api *api) { free(api); }

/* `count` NUL-terminated strings laid end to end in blob[0..len) into out[]; false if the
 * blob holds fewer */
static bool split_strings(const char *blob, size_t len, size_t count, const char **out) {
    size_t at = 0;
    for (size_t i = 0; i < count; i++) {
        const char *end = at < len ? memchr(blob + at, '\0', len - at) : NULL;
        if (end == NULL)
            return false;
        out[i] = blob + at;
        at = (size_t)(end - blob) + 1;
    }
    return true;
}

static bool same_file(int fd, const struct stat *want) {
    struct stat st;
    return fd >= 0 && fstat(fd, &st) == 0 && st.st_ino == want->st_ino &&
           st.st_dev == want->st_dev;
}

/* wasmtime's descriptor of the file `ours` names: most likely `probe` (the lowest free
 * number when it opened the file), else found among the process's descriptors */
static int find_theirs(int ours, int probe, const struct stat *st) {
    if (probe != ours && same_file(probe, st))
        return probe;
    DIR *dir = opendir("/proc/self/fd");
    if (dir == NULL)
        return -1;
    int found = -1;
    int dir_fd = dirfd(dir);
    for (struct dirent *d; found < 0 && (d = readdir(dir)) != NULL;) {
        char *end;
        long fd = strtol(d->d_name, &end, 10);
        if (*end == '\0' && end != d->d_name && fd != ours && fd != dir_fd &&
            same_file((int)fd, st))
            found = (int)fd;
    }
    closedir(dir);
    return found;
}

/* A sealed memfd of `room` bytes that wasmtime opened (by its /proc path) as the stream;
 * fds[0] ours, fds[1] wasmtime's. 0, or an errno. */
static int capture(const wasi_api *api, void *config, bool stdout_, int64_t room, int *fds) {
    int fd = memfd_create(stdout_ ? "wasinn-stdout" : "wasinn-stderr",
                          MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0)
        return errno;
    struct stat st;
    int probe = fstat(fd, &st) == 0 ? dup(fd) : -1;
    if (probe < 0) {
        int e = errno;
        close(fd);
        return e;
    }
    close(probe);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    bool opened = stdout_ ? api->set_stdout_file(config, path) : api->set_stderr_file(config, path);
    int theirs = opened ? find_theirs(fd, probe, &st) : -1;
    /* after wasmtime's open, which truncates */
    if (theirs < 0 || ftruncate(fd, room) != 0 ||
        fcntl(fd, F_ADD_SEALS, F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
        int e = theirs < 0 ? EIO : errno;
        close(fd); /* wasmtime's descriptor, if any, goes with the config */
        return e;
    }
    /* stdout's first page now (often on the reaper's thread), not in the guest's first
     * write, with the caches an inference left cold */
    if (stdout_ && room >= 4096)
        (void)fallocate(fd, 0, 0, 4096);
    fds[0] = fd;
    fds[1] = theirs;
    return 0;
}

/* stdout's and stderr's files (fds as fp_wasi_set gives them); on failure none is left */
static int capture_both(const wasi_api *api, void *config, int64_t stdout_room,
                        int64_t stderr_room, int *fds) {
    int failed = capture(api, config, true, stdout_room, fds);
    if (!failed && (failed = capture(api, config, false, stderr_room, fds + 2)) != 0) {
        close(fds[0]); /* wasmtime's descriptor goes with the config */
        fds[0] = fds[1] = -1;
    }
    return failed;
}

/* Close our descriptors of stdout's and stderr's files (fds as fp_wasi_set gives them:
 * wasmtime's go with its config or Store) and forget all four */
static void close_ours(int *fds) {
    for (int i = 0; i < 4; i += 2)
        if (fds[i] >= 0)
            close(fds[i]);
    fds[0] = fds[1] = fds[2] = fds[3] = -1;
}

/* a WASI config made ahead, with its stdout and stderr files (see fp_reaper_prepare) */
typedef struct {
    void *config;
    int fds[4];
} ready_config;

typedef struct reaper reaper;
static int reaper_take(reaper *r, ready_config *out);

/* 0: the store's WASI is set, fds = {stdout ours, stdout theirs, stderr ours, stderr
 * theirs}; else nothing is left made (the store has no WASI). `ahead`: a reaper whose
 * config made ahead (files made already) is taken if it has one, else NULL. */
int fp_wasi_set(const wasi_api *api, reaper *ahead, void *context, const char *argv,
                size_t argv_len,
                size_t argc, const char *env, size_t env_len, size_t envc,
                const uint8_t *stdin_data, size_t stdin_len, const char *dirs, size_t dirs_len,
                size_t ndirs, int64_t stdout_room, int64_t stderr_room, int *fds) {
    size_t nstrings = argc + 2 * envc + 2 * ndirs;
    const char **strings = malloc((nstrings ? nstrings : 1) * sizeof(char *));
    if (strings == NULL)
        return ENOMEM;
    const char **args = strings, **names = strings + argc, **dir_strings = names + 2 * envc;
    if (!split_strings(argv, argv_len, argc, args) ||
        !split_strings(env, env_len, 2 * envc, names) ||
        !split_strings(dirs, dirs_len, 2 * ndirs, dir_strings)) {
        free(strings);
        return EINVAL;
    }
    ready_config made = {NULL, {-1, -1, -1, -1}};
    bool have = ahead != NULL && reaper_take(ahead, &made);
    void *config = have ? made.config : api->config_new();
    if (config == NULL) {
        free(strings);
        return ENOMEM;
    }
    memcpy(fds, made.fds, sizeof made.fds);
    int failed = 0;
    const char **values = malloc((envc ? envc : 1) * sizeof(char *));
    const char **keys = malloc((envc ? envc : 1) * sizeof(char *));
    if (values == NULL || keys == NULL) {
        failed = ENOMEM;
    } else {
        for (size_t i = 0; i < envc; i++) { /* names and values alternate in the blob */
            keys[i] = names[2 * i];
            values[i] = names[2 * i + 1];
        }
        if (!api->set_argv(config, argc, args) || !api->set_env(config, envc, keys, values))
            failed = EINVAL;
    }
    free(values);
    free(keys);
    for (size_t i = 0; !failed && i < ndirs; i++)
        if (!api->preopen_dir(config, dir_strings[2 * i], dir_strings[2 * i + 1], true))
            failed = ENOENT;
    free(strings);
    if (!failed) {
        byte_vec body;
        api->byte_vec_new(&body, stdin_len, stdin_data);
        api->set_stdin_bytes(config, &body); /* takes the vector's bytes */
    }
    if (!failed && !have)
        failed = capture_both(api, config, stdout_room, stderr_room, fds);
    if (failed) {
        api->config_delete(config);
    } else {
        void *error = api->context_set_wasi(context, config); /* takes the config */
        if (error != NULL) {
            api->error_delete(error);
            failed = EINVAL;
        }
    }
    if (failed)
        close_ours(fds);
    return failed;
}

/* How far wasmtime's descriptor `theirs` of the file `ours` has written: its offset (lseek
 * with SEEK_CUR moves nothing; one call, where /proc/self/fdinfo took three); -1 if
 * `theirs` no longer names that file. */
int64_t fp_written(int ours, int theirs) {
    struct stat st;
    if (ours < 0 || theirs < 0 || theirs == ours || fstat(ours, &st) != 0 ||
        !same_file(theirs, &st))
        return -1;
    off_t pos = lseek(theirs, 0, SEEK_CUR);
    return pos < 0 ? -1 : (int64_t)pos;
}

/*
 * A reaper: a thread that deletes finished Stores, so that a request's response does not
 * wait for its Store's teardown (its memory zeroed or unmapped: 0.1-0.3 ms). Python hands
 * over the store pointer (taken from its wasmtime.Store, whose own delete then does nothing)
 * after it has dropped every registration naming that store. No Python runs here: the stores
 * handed over hold no Python callbacks.
 */
typedef void (*store_delete_fn)(void *store);

#define MAX_READY 8

/* a Store handed over, and descriptors to close once it is deleted (-1: none) */
typedef struct {
    void *store;
    int fds[2];
} dropped;

/* the C API functions that make a Store with an instance in it (fp_reaper_instances) */
typedef struct {
    void *(*store_new)(void *engine, void *data, void *finalizer);
    void *(*store_context)(void *store);
    void (*store_limiter)(void *store, int64_t memory_size, int64_t table_elements,
                          int64_t instances, int64_t tables, int64_t memories);
    void (*set_epoch_deadline)(void *context, uint64_t ticks_beyond_current);
    void *(*pre_instantiate)(const void *pre, void *context, void *instance, void **trap);
    void (*error_delete)(void *error);
    void (*trap_delete)(void *trap);
    /* what fp_route_run calls */
    bool (*instance_export_get)(void *context, const void *instance, const char *name,
                                size_t len, void *item);
    void *(*func_call)(void *context, const void *func, const void *args, size_t nargs,
                       void *results, size_t nresults, void **trap);
    bool (*error_exit_status)(const void *error, int *status);
} store_api;

#define STORE_API_FUNCS 10
#define INSTANCE_BYTES 32 /* room for a wasmtime_instance_t (16 bytes on 64-bit) */

/* a Store with a fresh instance of the route's module, no guest code run yet */
typedef struct {
    void *store;
    uint8_t instance[INSTANCE_BYTES];
} ready_instance;

struct reaper {
    pthread_mutex_t lock;
    pthread_cond_t wake, idle;
    pthread_t thread;
    store_delete_fn store_delete;
    dropped *queue;
    size_t cap, head, len;
    int busy, stop, started;
    /* configs made ahead: up to `want`, with files of these rooms; `failed`: the last try
     * failed (no retry until one is taken) */
    wasi_api api; /* a copy: the caller's may go before this reaper does */
    bool has_api;
    int64_t stdout_room, stderr_room;
    size_t want, nready;
    int failed;
    ready_config ready[MAX_READY];
    /* instances made ahead (fp_reaper_instances): up to `want_instances`, each in a Store of
     * its own; `instance_failed`: the last try failed (no retry until a Store is deleted) */
    store_api sapi;
    bool has_sapi;
    void *engine;
    const void *pre;
    int64_t memory_size;
    uint64_t deadline;
    size_t want_instances, ninstances;
    int instance_failed;
    ready_instance instances[MAX_READY];
    size_t extern_size, extern_of, func_kind; /* wasmtime_extern_t's layout */
};

reaper *fp_reaper_new(void *store_delete, size_t max_pending) {
    if (store_delete == NULL || max_pending == 0)
        return NULL;
    reaper *r = calloc(1, sizeof(reaper));
    if (r == NULL)
        return NULL;
    r->queue = calloc(max_pending, sizeof(dropped));
    if (r->queue == NULL) {
        free(r);
        return NULL;
    }
    pthread_mutex_init(&r->lock, NULL);
    pthread_cond_init(&r->wake, NULL);
    pthread_cond_init(&r->idle, NULL);
    r->store_delete = (store_delete_fn)store_delete;
    r->cap = max_pending;
    return r;
}

/* is there a config to make ahead? (under the lock) */
static bool wants_config(const reaper *r) {
    return r->has_api && r->nready < r->want && !r->failed;
}

/* is there an instance to make ahead? (under the lock) */
static bool wants_instance(const reaper *r) {
    return r->has_sapi && r->ninstances < r->want_instances && !r->instance_failed;
}

/* a Store as the host's add_to_store leaves one (memory limit, a deadline far off), with an
 * instance made from the InstancePre; false if either failed (nothing is left) */
static void *new_store(reaper *r) {
    const store_api *api = &r->sapi;
    void *store = api->store_new(r->engine, NULL, NULL);
    if (store == NULL)
        return NULL;
    if (r->memory_size >= 0)
        api->store_limiter(store, r->memory_size, -1, -1, -1, -1);
    api->set_epoch_deadline(api->store_context(store), r->deadline);
    return store;
}

static bool make_instance(reaper *r, ready_instance *out) {
    const store_api *api = &r->sapi;
    void *store = new_store(r);
    if (store == NULL)
        return false;
    void *context = api->store_context(store);
    void *trap = NULL;
    void *error = api->pre_instantiate(r->pre, context, out->instance, &trap);
    if (error != NULL || trap != NULL) {
        if (error != NULL)
            api->error_delete(error);
        if (trap != NULL)
            api->trap_delete(trap);
        r->store_delete(store);
        return false;
    }
    out->store = store;
    return true;
}

static void *reaper_loop(void *arg) {
    reaper *r = arg;
    pthread_mutex_lock(&r->lock);
    for (;;) {
        while (r->len == 0 && !r->stop && !wants_config(r) && !wants_instance(r))
            pthread_cond_wait(&r->wake, &r->lock);
        if (r->len > 0) {
            dropped item = r->queue[r->head];
            r->head = (r->head + 1) % r->cap;
            r->len--;
            r->busy = 1;
            pthread_mutex_unlock(&r->lock);
            r->store_delete(item.store);
            for (int i = 0; i < 2; i++) /* after the Store's own, often the files' last */
                if (item.fds[i] >= 0)
                    close(item.fds[i]);
            pthread_mutex_lock(&r->lock);
            r->instance_failed = 0; /* its instance slot, if pooled, is free again */
        } else if (!r->stop && wants_instance(r)) {
            r->busy = 1;
            pthread_mutex_unlock(&r->lock);
            ready_instance made;
            bool ok = make_instance(r, &made);
            pthread_mutex_lock(&r->lock);
            if (!ok)
                r->instance_failed = 1;
            else if (r->ninstances < r->want_instances)
                r->instances[r->ninstances++] = made;
            else { /* fewer wanted now */
                pthread_mutex_unlock(&r->lock);
                r->store_delete(made.store);
                pthread_mutex_lock(&r->lock);
            }
        } else if (!r->stop) { /* wants_config */
            r->busy = 1;
            pthread_mutex_unlock(&r->lock);
            ready_config made = {NULL, {-1, -1, -1, -1}};
            made.config = r->api.config_new();
            int failed = made.config == NULL;
            if (!failed && capture_both(&r->api, made.config, r->stdout_room, r->stderr_room,
                                        made.fds) != 0) {
                failed = 1;
                r->api.config_delete(made.config);
            }
            pthread_mutex_lock(&r->lock);
            if (failed)
                r->failed = 1;
            else
                r->ready[r->nready++] = made;
        } else {
            break; /* stopping, and nothing left to delete */
        }
        r->busy = 0;
        if (r->len == 0 && !wants_config(r) && !wants_instance(r))
            pthread_cond_broadcast(&r->idle);
    }
    pthread_cond_broadcast(&r->idle);
    pthread_mutex_unlock(&r->lock);
    return NULL;
}

static void reaper_start(reaper *r) { /* under the lock */
    if (!r->started && !r->stop && pthread_create(&r->thread, NULL, reaper_loop, r) == 0)
        r->started = 1;
}

/* after a setting changed (under the lock, which this releases): the thread started and
 * woken to make what is now wanted; whether it runs */
static int reaper_configured(reaper *r) {
    reaper_start(r);
    pthread_cond_signal(&r->wake);
    int ok = r->started;
    pthread_mutex_unlock(&r->lock);
    return ok;
}

/* 1: the reaper will delete `store`; 0: it cannot take it (full, stopped, no thread): the
 * caller deletes it itself */
static int reaper_drop(reaper *r, void *store, int fd_a, int fd_b) {
    int taken = 0;
    pthread_mutex_lock(&r->lock);
    reaper_start(r);
    if (r->started && !r->stop && r->len < r->cap) {
        r->queue[(r->head + r->len) % r->cap] = (dropped){store, {fd_a, fd_b}};
        r->len++;
        taken = 1;
    }
    pthread_mutex_unlock(&r->lock);
    if (taken) /* after the unlock: the thread woken does not wait for the lock at once */
        pthread_cond_signal(&r->wake);
    return taken;
}

int fp_reaper_drop(reaper *r, void *store) { return reaper_drop(r, store, -1, -1); }

/* Make WASI configs ahead, `want` of them (at most MAX_READY), each with stdout and stderr
 * files of these rooms, made as fp_wasi_set makes them: the two files cost ~0.12 ms of a
 * request after an inference's cold caches. fp_wasi_set takes one when there is one. */
int fp_reaper_prepare(reaper *r, const wasi_api *api, int64_t stdout_room,
                      int64_t stderr_room, size_t want) {
    if (api == NULL || want > MAX_READY)
        return 0;
    pthread_mutex_lock(&r->lock);
    r->api = *api;
    r->has_api = true;
    r->stdout_room = stdout_room;
    r->stderr_room = stderr_room;
    r->want = want;
    return reaper_configured(r);
}

/* a config made ahead (1), or none (0) */
static int reaper_take(reaper *r, ready_config *out) {
    int taken = 0;
    pthread_mutex_lock(&r->lock);
    if (r->nready > 0) {
        *out = r->ready[--r->nready];
        taken = 1;
    }
    r->failed = 0; /* one taken or none there: worth trying again */
    /* no wake-up here: the thread makes the next one when the Store is handed over, after
     * the response, not beside this request (the wake-up alone cost ~20 us in it) */
    pthread_mutex_unlock(&r->lock);
    return taken;
}

/* Make instances ahead, `want` of them (at most MAX_READY): each a Store on `engine` with
 * this memory limit (-1: none) and epoch deadline, and an instance from the InstancePre
 * `pre` (a module without a start function: no guest code runs here; `want` 0: none).
 * fp_route_begin takes one, or makes a Store the same way: the Store and the instantiation
 * cost ~0.25 ms of a request after an inference's cold caches. `engine` and `pre` must
 * outlive the reaper. */
int fp_reaper_instances(reaper *r, void *const *funcs, size_t n, void *engine, const void *pre,
                        int64_t memory_size, uint64_t deadline, size_t want,
                        size_t extern_size, size_t extern_of, size_t func_kind) {
    if (n != STORE_API_FUNCS || engine == NULL || pre == NULL || want > MAX_READY ||
        extern_size > 64 || extern_of >= extern_size)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (funcs[i] == NULL)
            return 0;
    pthread_mutex_lock(&r->lock);
    memcpy(&r->sapi, funcs, sizeof r->sapi); /* the same order, all function pointers */
    r->has_sapi = true;
    r->engine = engine;
    r->pre = pre;
    r->memory_size = memory_size;
    r->deadline = deadline;
    r->want_instances = want;
    r->instance_failed = 0;
    r->extern_size = extern_size;
    r->extern_of = extern_of;
    r->func_kind = func_kind;
    return reaper_configured(r);
}

/* wait until every store handed over is deleted, and the configs and instances wanted are
 * made */
void fp_reaper_settle(reaper *r) {
    pthread_mutex_lock(&r->lock);
    while (r->started && (r->len || r->busy || wants_config(r) || wants_instance(r)))
        pthread_cond_wait(&r->idle, &r->lock);
    pthread_mutex_unlock(&r->lock);
}

/* a worker thread's end: *stop set under its lock, the thread woken and waited for (it
 * finishes what it holds), then its lock and wake-up freed */
static void worker_stop(pthread_mutex_t *lock, pthread_cond_t *wake, int *stop,
                        const int *started, pthread_t *thread) {
    pthread_mutex_lock(lock);
    *stop = 1;
    int was_started = *started;
    pthread_cond_signal(wake);
    pthread_mutex_unlock(lock);
    if (was_started)
        pthread_join(*thread, NULL);
    pthread_cond_destroy(wake);
    pthread_mutex_destroy(lock);
}

/* delete what is queued, stop the thread, free the reaper */
void fp_reaper_close(reaper *r) {
    if (r == NULL)
        return;
    worker_stop(&r->lock, &r->wake, &r->stop, &r->started, &r->thread);
    pthread_cond_destroy(&r->idle);
    for (size_t i = 0; i < r->nready; i++) {
        close_ours(r->ready[i].fds);
        r->api.config_delete(r->ready[i].config); /* closes wasmtime's descriptors */
    }
    for (size_t i = 0; i < r->ninstances; i++)
        r->store_delete(r->instances[i].store);
    free(r->queue);
    free(r);
}

/*
 * The epoch ticker: advances an engine's epoch every `tick` while any guest runs under a
 * deadline, and for LINGER_TICKS more after the last, then sleeps. In Python, its thread took
 * the GIL at each tick and as each request started (about 0.08 ms a request on the edge
 * route); waking the sleeping thread cost a request ~30 us (a 2-core VM), so requests that
 * come one after another find it ticking.
 */
#define LINGER_TICKS 50
typedef void (*increment_epoch_fn)(void *engine);

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t wake;
    pthread_t thread;
    increment_epoch_fn increment;
    void *engine;
    struct timespec tick;
    int active, stop, started;
    int sleeping, linger; /* waiting for a guest; ticks left with none */
} ticker;

ticker *fp_ticker_new(void *increment, void *engine, long tick_us) {
    if (increment == NULL || engine == NULL || tick_us <= 0)
        return NULL;
    ticker *t = calloc(1, sizeof(ticker));
    if (t == NULL)
        return NULL;
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->wake, NULL);
    t->increment = (increment_epoch_fn)increment;
    t->engine = engine;
    t->tick.tv_sec = tick_us / 1000000;
    t->tick.tv_nsec = (tick_us % 1000000) * 1000;
    return t;
}

static void *ticker_loop(void *arg) {
    ticker *t = arg;
    pthread_mutex_lock(&t->lock);
    while (!t->stop) {
        if (t->active > 0) {
            t->linger = LINGER_TICKS;
        } else if (t->linger > 0) {
            t->linger--;
        } else {
            t->sleeping = 1;
            pthread_cond_wait(&t->wake, &t->lock);
            t->sleeping = 0;
            continue;
        }
        pthread_mutex_unlock(&t->lock);
        t->increment(t->engine);
        nanosleep(&t->tick, NULL);
        pthread_mutex_lock(&t->lock);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

/* a guest starts running under a deadline: 1, or 0 if no thread could be started */
int fp_ticker_enter(ticker *t) {
    int ok = 1;
    pthread_mutex_lock(&t->lock);
    if (!t->started && !t->stop && pthread_create(&t->thread, NULL, ticker_loop, t) == 0)
        t->started = 1;
    bool wake = false;
    if (!t->started || t->stop)
        ok = 0; /* not counted: the caller ticks some other way */
    else
        wake = ++t->active == 1 && t->sleeping;
    pthread_mutex_unlock(&t->lock);
    if (wake) /* after the unlock: the thread woken does not wait for the lock at once */
        pthread_cond_signal(&t->wake);
    return ok;
}

void fp_ticker_leave(ticker *t) {
    pthread_mutex_lock(&t->lock);
    if (t->active > 0)
        t->active--;
    pthread_mutex_unlock(&t->lock);
}

void fp_ticker_close(ticker *t) {
    if (t == NULL)
        return;
    worker_stop(&t->lock, &t->wake, &t->stop, &t->started, &t->thread);
    free(t);
}

/*
 * A route's request driven from C, in three calls (Python registers the request's wasi-nn
 * state between the first two, and reads the outputs between the last two): after an
 * inference, with cold caches, every Python step of the request cost more than its C twin.
 *   fp_route_begin: a Store (one made ahead with its instance, else a new one) with the
 *     request's WASI (fp_wasi_set);
 *   fp_route_run: its deadline, the instance (if none was made ahead), `_start`, and how
 *     much the guest wrote to stdout and stderr;
 *   fp_route_end: the Store to the reaper, our descriptors of the output files closed.
 */
typedef struct {
    void *store, *context;
    uint8_t instance[INSTANCE_BYTES];
    int32_t has_instance;
    int32_t fds[4];
    /* set by fp_route_run */
    int32_t outcome; /* ROUTE_* */
    int32_t exit_code;
    void *error, *trap; /* the caller's to delete (Python takes them) */
    int64_t out_len, err_len;
    int64_t instantiate_ns;
} route_request;

#define ROUTE_RAN 0          /* returned, or exited with exit_code */
#define ROUTE_ERROR 1        /* `error` from _start */
#define ROUTE_TRAP 2         /* `trap` from _start */
#define ROUTE_NO_INSTANCE 3  /* instantiation failed: `error` or `trap` says why */
#define ROUTE_NO_START 4     /* no _start function */
#define ROUTE_NO_TICKER 5    /* no thread to count the deadline */

/* 0: q holds a Store with the request's WASI; else an errno and nothing is left */
int fp_route_begin(reaper *r, const wasi_api *api, const char *argv, size_t argv_len,
                   size_t argc, const char *env, size_t env_len, size_t envc,
                   const uint8_t *stdin_data, size_t stdin_len, const char *dirs,
                   size_t dirs_len, size_t ndirs, int64_t stdout_room, int64_t stderr_room,
                   route_request *q) {
    memset(q, 0, sizeof *q);
    for (int i = 0; i < 4; i++)
        q->fds[i] = -1;
    if (!r->has_sapi)
        return EINVAL;
    ready_instance made;
    bool have = false;
    pthread_mutex_lock(&r->lock);
    if (r->ninstances > 0) {
        made = r->instances[--r->ninstances];
        have = true;
    }
    pthread_mutex_unlock(&r->lock);
    if (have) {
        q->store = made.store;
        memcpy(q->instance, made.instance, INSTANCE_BYTES);
        q->has_instance = 1;
    } else if ((q->store = new_store(r)) == NULL) {
        return ENOMEM;
    }
    q->context = r->sapi.store_context(q->store);
    int fds[4];
    int failed = fp_wasi_set(api, r, q->context, argv, argv_len, argc, env, env_len, envc,
                             stdin_data, stdin_len, dirs, dirs_len, ndirs, stdout_room,
                             stderr_room, fds);
    if (failed) {
        r->store_delete(q->store);
        memset(q, 0, sizeof *q);
        return failed;
    }
    for (int i = 0; i < 4; i++)
        q->fds[i] = fds[i];
    return 0;
}

/* Run the request's guest: `deadline_ticks` epochs from now (< 0: none), counted by `tk`.
 * Sets q->outcome (and exit_code, error, trap) and the output lengths. */
void fp_route_run(reaper *r, ticker *tk, route_request *q, int64_t deadline_ticks) {
    const store_api *api = &r->sapi;
    q->outcome = ROUTE_RAN;
    q->exit_code = 0;
    q->error = q->trap = NULL;
    bool timed = deadline_ticks >= 0;
    if (timed) {
        api->set_epoch_deadline(q->context, (uint64_t)deadline_ticks);
        if (tk == NULL || !fp_ticker_enter(tk)) {
            q->outcome = ROUTE_NO_TICKER;
            return;
        }
    }
    if (!q->has_instance) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        q->error = api->pre_instantiate(r->pre, q->context, q->instance, &q->trap);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        q->instantiate_ns = (t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
        if (q->error != NULL || q->trap != NULL)
            q->outcome = ROUTE_NO_INSTANCE;
        else
            q->has_instance = 1;
    }
    if (q->outcome == ROUTE_RAN) {
        _Alignas(16) uint8_t item[64];
        memset(item, 0, sizeof item);
        if (!api->instance_export_get(q->context, q->instance, "_start", 6, item) ||
            item[0] != r->func_kind) {
            q->outcome = ROUTE_NO_START;
        } else {
            void *error = api->func_call(q->context, item + r->extern_of, NULL, 0, NULL, 0,
                                         &q->trap);
            int status = 0;
            if (error != NULL && api->error_exit_status(error, &status)) {
                api->error_delete(error); /* proc_exit: an exit, not an error */
                q->exit_code = status;
            } else if (error != NULL) {
                q->error = error;
                q->outcome = ROUTE_ERROR;
            } else if (q->trap != NULL) {
                q->outcome = ROUTE_TRAP;
            }
        }
    }
    if (timed)
        fp_ticker_leave(tk);
    q->out_len = fp_written(q->fds[0], q->fds[1]);
    q->err_len = fp_written(q->fds[2], q->fds[3]);
}

/* the Store to the reaper (deleted here if it is full), our output descriptors closed;
 * call after Python has forgotten the store's wasi-nn state and read the outputs */
void fp_route_end(reaper *r, route_request *q) {
    /* our descriptors of the output files go with the Store (closing the last one frees the
     * file's pages: ~10 us) */
    if (q->store == NULL || !reaper_drop(r, q->store, q->fds[0], q->fds[2])) {
        if (q->store != NULL)
            r->store_delete(q->store);
        close_ours(q->fds);
    }
    q->store = q->context = NULL;
    for (int i = 0; i < 4; i++)
        q->fds[i] = -1;
}
