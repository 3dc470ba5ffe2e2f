/* Kernel profile tables for tests/gpu/kprof.c, the CUPTI tracer that a GPU
 * run loads as CUDA_INJECTION64_PATH (tests/gpu/README.md): the records
 * (kernels, copies, memsets, each a name and a start/end in ns), the
 * sections a program marks around its timed calls (bench_sd: one per
 * figure), and the report, a markdown table per section of where the time
 * went per call: by category (cuDNN convolutions, cuBLAS GEMMs, cuDNN's
 * layout transposes, our 16-bit conversions, attention, norms, ...) and by
 * kernel.  Plain C without CUDA, so make check tests it on the CPU
 * (tests/unit/test_kprof.c). */
#ifndef DB_KPROF_H
#define DB_KPROF_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

typedef struct kp_rec {
    uint64_t start, end;
    uint32_t name;
    uint32_t host; /* a host API call (kp_add_host), not GPU work */
} kp_rec;

typedef struct kp_sec {
    char label[96];
    uint64_t t0, t1; /* [t0, t1): the records that start inside belong to it */
    int calls;       /* the timed calls inside: the report divides by it */
} kp_sec;

typedef struct kp_prof {
    char **names; /* interned; a record's name is an index here */
    char **cfgs;  /* per name: its first launch's configuration (kp_config), or NULL */
    size_t nn, cn;
    uint32_t *hash; /* open addressing, index + 1 (0 empty) */
    size_t hcap;
    kp_rec *rec;
    size_t nr, cr;
    kp_sec *sec;
    size_t ns, cs;
    int open;            /* a section begun and not yet ended */
    unsigned long lost;  /* records dropped (out of memory here, or by the tracer) */
} kp_prof;

/* A record: name (copied), its start and end.  0, or -1 out of memory (counted in lost). */
int kp_add(kp_prof *p, const char *name, uint64_t start, uint64_t end);
/* A host API call (a CUDA runtime or driver function, by name) from start
 * to end: not GPU work (the busy time and kernel rows leave it out), but
 * the idle table names the calls that cover each idle stretch, and each
 * section gets a table of the host calls' time: what the host was doing
 * while the GPU waited (a synchronize, a copy from pageable memory, a
 * graph launch, or no CUDA call at all: host work). */
int kp_add_host(kp_prof *p, const char *name, uint64_t start, uint64_t end);
/* A kernel's launch configuration (grid, block, registers per thread,
 * shared memory per block), kept for its name's first launch and shown in
 * the kernel rows: occupancy at a glance.  After kp_add of the name. */
void kp_config(kp_prof *p, const char *name, int gx, int gy, int gz, int bx, int by, int bz, int regs,
               long smem_bytes);
/* Begin a section at time t (ending one left open there); end the open
 * section at t with `calls` timed calls (at least 1 counts).  0, or -1
 * (out of memory; end without a begin). */
int kp_begin(kp_prof *p, const char *label, uint64_t t);
int kp_end(kp_prof *p, uint64_t t, int calls);
/* The readable part of a kernel's name: a C++ mangled name's identifier
 * (nested names joined by ::, template arguments dropped), else the name. */
void kp_readable(const char *name, char *out, size_t cap);
/* The category of a (readable) kernel name, e.g. "cuDNN convolution". */
const char *kp_category(const char *readable);
/* Markdown tables, one per section (with no section: the whole run as
 * one, titled `whole`), with at most `top` kernel rows each. */
void kp_report(const kp_prof *p, FILE *f, const char *whole, int top);
void kp_free(kp_prof *p);

#endif
