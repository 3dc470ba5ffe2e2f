/* CPU backend state: the oneDNN engine and stream, a cache of primitives keyed
 * by shape, and one growing scratch buffer.  All of it lives in the ctx (no
 * global mutable state), so two contexts never share or race on it. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

int db_cpu_dnnl_fail(db_ctx *c, dnnl_status_t s, const char *what)
{
    const char *why = s == dnnl_out_of_memory     ? "out of memory"
                      : s == dnnl_invalid_arguments ? "invalid arguments"
                      : s == dnnl_unimplemented     ? "no implementation for these sizes"
                      : s == dnnl_runtime_error     ? "runtime error"
                                                    : "failed";
    return db_err_set(&c->err, s == dnnl_out_of_memory ? DB_ENOMEM : DB_EUNSUPP, "oneDNN %s: %s (status %d)", what,
                      why, (int)s);
}

int db_cpu_init(db_ctx *c)
{
    db_cpu *cpu = calloc(1, sizeof *cpu);
    if (!cpu)
        return db_err_set(&c->err, DB_ENOMEM, "cpu context: out of memory");
    c->cpu = cpu;
    /* The OpenMP thread count is per calling thread but effectively process
     * wide (see ops.h); oneDNN's OpenMP runtime reads it at each call. */
    omp_set_num_threads(c->threads);
    dnnl_status_t s = dnnl_engine_create(&cpu->engine, dnnl_cpu, 0);
    if (s != dnnl_success)
        return db_cpu_dnnl_fail(c, s, "engine create");
    s = dnnl_stream_create(&cpu->stream, cpu->engine, dnnl_stream_default_flags);
    if (s != dnnl_success)
        return db_cpu_dnnl_fail(c, s, "stream create");
    return 0;
}

static void cache_clear(db_cpu *cpu)
{
    for (size_t i = 0; i < cpu->cache_cap; i++)
        if (cpu->cache[i].val && cpu->cache[i].destroy)
            cpu->cache[i].destroy(cpu->cache[i].val);
    free(cpu->cache);
    cpu->cache = NULL;
    cpu->cache_n = cpu->cache_cap = 0;
}

void db_cpu_trim(db_ctx *c)
{
    db_cpu *cpu = c->cpu;
    if (!cpu)
        return;
    cache_clear(cpu);
    free(cpu->scratch);
    cpu->scratch = NULL;
    cpu->scratch_size = 0;
}

void db_cpu_free(db_ctx *c)
{
    db_cpu *cpu = c->cpu;
    if (!cpu)
        return;
    db_cpu_trim(c);
    if (cpu->stream)
        dnnl_stream_destroy(cpu->stream);
    if (cpu->engine)
        dnnl_engine_destroy(cpu->engine);
    free(cpu);
    c->cpu = NULL;
}

/* FNV-1a over the key's bytes. */
static size_t key_hash(const int64_t key[DB_CPU_KEYLEN])
{
    uint64_t h = 1469598103934665603ull;
    const unsigned char *p = (const unsigned char *)key;
    for (size_t i = 0; i < DB_CPU_KEYLEN * sizeof key[0]; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return (size_t)h;
}

void *db_cpu_cache_get(db_ctx *c, const int64_t key[DB_CPU_KEYLEN])
{
    db_cpu *cpu = c->cpu;
    if (!cpu->cache_cap)
        return NULL;
    size_t mask = cpu->cache_cap - 1;
    for (size_t i = key_hash(key) & mask;; i = (i + 1) & mask) {
        db_cpu_cache_entry *e = &cpu->cache[i];
        if (!e->val)
            return NULL;
        if (!memcmp(e->key, key, sizeof e->key))
            return e->val;
    }
}

static void cache_insert(db_cpu_cache_entry *tab, size_t cap, const db_cpu_cache_entry *e)
{
    size_t mask = cap - 1;
    size_t i = key_hash(e->key) & mask;
    while (tab[i].val)
        i = (i + 1) & mask;
    tab[i] = *e;
}

int db_cpu_cache_put(db_ctx *c, const int64_t key[DB_CPU_KEYLEN], void *val, void (*destroy)(void *val))
{
    db_cpu *cpu = c->cpu;
    if (2 * (cpu->cache_n + 1) > cpu->cache_cap) { /* keep the load under 1/2 */
        size_t cap = cpu->cache_cap ? 2 * cpu->cache_cap : 64;
        db_cpu_cache_entry *tab = calloc(cap, sizeof *tab);
        if (!tab) {
            destroy(val);
            return db_err_set(&c->err, DB_ENOMEM, "primitive cache: out of memory");
        }
        for (size_t i = 0; i < cpu->cache_cap; i++)
            if (cpu->cache[i].val)
                cache_insert(tab, cap, &cpu->cache[i]);
        free(cpu->cache);
        cpu->cache = tab;
        cpu->cache_cap = cap;
    }
    db_cpu_cache_entry e = {.val = val, .destroy = destroy};
    memcpy(e.key, key, sizeof e.key);
    cache_insert(cpu->cache, cpu->cache_cap, &e);
    cpu->cache_n++;
    return 0;
}

void *db_cpu_scratch(db_ctx *c, size_t bytes)
{
    db_cpu *cpu = c->cpu;
    if (bytes <= cpu->scratch_size)
        return cpu->scratch;
    free(cpu->scratch);
    cpu->scratch_size = 0;
    /* Grow by at least 1/4 so a slowly rising demand reallocates rarely. */
    size_t want = bytes + bytes / 4;
    want = (want + 4095) & ~(size_t)4095;
    cpu->scratch = aligned_alloc(64, want);
    if (!cpu->scratch) {
        db_err_set(&c->err, DB_ENOMEM, "scratch: out of memory (%zu bytes)", want);
        return NULL;
    }
    cpu->scratch_size = want;
    return cpu->scratch;
}
