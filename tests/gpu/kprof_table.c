/* Kernel profile tables: see kprof.h. */
#include "tests/gpu/kprof.h"

#include <ctype.h>
#include <stdlib.h>
#include <string.h>

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* The index of name, interned on first sight; -1 out of memory. */
static long intern(kp_prof *p, const char *name)
{
    if (2 * (p->nn + 1) > p->hcap) { /* grow the table, rehash */
        const size_t cap = p->hcap ? 2 * p->hcap : 256;
        uint32_t *h = calloc(cap, sizeof *h);
        if (!h)
            return -1;
        for (size_t i = 0; i < p->nn; i++) {
            size_t j = fnv1a(p->names[i]) & (cap - 1);
            while (h[j])
                j = (j + 1) & (cap - 1);
            h[j] = (uint32_t)i + 1;
        }
        free(p->hash);
        p->hash = h, p->hcap = cap;
    }
    size_t j = fnv1a(name) & (p->hcap - 1);
    for (; p->hash[j]; j = (j + 1) & (p->hcap - 1))
        if (!strcmp(p->names[p->hash[j] - 1], name))
            return (long)p->hash[j] - 1;
    if (p->nn == p->cn) {
        const size_t cn = p->cn ? 2 * p->cn : 256;
        char **v = realloc(p->names, cn * sizeof *v), **w = v ? realloc(p->cfgs, cn * sizeof *w) : NULL;
        if (v)
            p->names = v;
        if (!w)
            return -1;
        p->cfgs = w, p->cn = cn;
    }
    char *copy = strdup(name);
    if (!copy)
        return -1;
    p->cfgs[p->nn] = NULL;
    p->names[p->nn] = copy;
    p->hash[j] = (uint32_t)++p->nn;
    return (long)p->nn - 1;
}

static int add(kp_prof *p, const char *name, uint64_t start, uint64_t end, uint32_t host)
{
    const long id = intern(p, name && *name ? name : "(unnamed)");
    if (id >= 0 && p->nr == p->cr) {
        const size_t cr = p->cr ? 2 * p->cr : 4096;
        kp_rec *v = realloc(p->rec, cr * sizeof *v);
        if (v)
            p->rec = v, p->cr = cr;
    }
    if (id < 0 || p->nr == p->cr) {
        p->lost++;
        return -1;
    }
    p->rec[p->nr++] = (kp_rec){start, end < start ? start : end, (uint32_t)id, host};
    return 0;
}

int kp_add(kp_prof *p, const char *name, uint64_t start, uint64_t end)
{
    return add(p, name, start, end, 0);
}

int kp_add_host(kp_prof *p, const char *name, uint64_t start, uint64_t end)
{
    return add(p, name, start, end, 1);
}

void kp_config(kp_prof *p, const char *name, int gx, int gy, int gz, int bx, int by, int bz, int regs,
               long smem_bytes)
{
    const long id = name && *name ? intern(p, name) : -1;
    if (id < 0 || p->cfgs[id])
        return;
    char buf[96];
    snprintf(buf, sizeof buf, "%dx%dx%d x %d, %d regs, %ld KB smem", gx, gy, gz, bx * by * bz, regs,
             (smem_bytes + 1023) / 1024);
    p->cfgs[id] = strdup(buf);
}

int kp_begin(kp_prof *p, const char *label, uint64_t t)
{
    if (p->open)
        kp_end(p, t, 1);
    if (p->ns == p->cs) {
        const size_t cs = p->cs ? 2 * p->cs : 16;
        kp_sec *v = realloc(p->sec, cs * sizeof *v);
        if (!v)
            return -1;
        p->sec = v, p->cs = cs;
    }
    kp_sec *s = &p->sec[p->ns++];
    memset(s, 0, sizeof *s);
    snprintf(s->label, sizeof s->label, "%s", label ? label : "");
    s->t0 = s->t1 = t;
    p->open = 1;
    return 0;
}

int kp_end(kp_prof *p, uint64_t t, int calls)
{
    if (!p->open)
        return -1;
    kp_sec *s = &p->sec[p->ns - 1];
    s->t1 = t < s->t0 ? s->t0 : t;
    s->calls = calls < 1 ? 1 : calls;
    p->open = 0;
    return 0;
}

/* ---- names ------------------------------------------------------------------------------ */

/* <digits><identifier> at *s: the identifier's length (its start at *s
 * after), 0 when s does not hold one whole. */
static size_t source_name(const char **s)
{
    const char *q = *s;
    size_t n = 0;
    if (!isdigit((unsigned char)*q))
        return 0;
    while (isdigit((unsigned char)*q))
        n = 10 * n + (size_t)(*q++ - '0');
    if (n == 0 || strnlen(q, n) < n)
        return 0;
    *s = q;
    return n;
}

static void append(char *out, size_t cap, size_t *len, const char *s, size_t n)
{
    if (*len + 1 >= cap)
        return;
    if (n > cap - 1 - *len)
        n = cap - 1 - *len;
    memcpy(out + *len, s, n);
    *len += n;
    out[*len] = 0;
}

void kp_readable(const char *name, char *out, size_t cap)
{
    if (!cap)
        return;
    out[0] = 0;
    if (strncmp(name, "_Z", 2)) {
        snprintf(out, cap, "%s", name);
        return;
    }
    size_t len = 0;
    const char *s = name + 2;
    const int nested = *s == 'N';
    if (nested)
        for (s++; *s && strchr("rVKRO", *s); s++) /* qualifiers of a member function */
            ;
    if (*s == 'L')  /* internal linkage */
        s++;
    int parts = 0;
    for (;;) {
        size_t n;
        if (s[0] == 'S' && s[1] == 't') { /* std:: */
            if (parts++)
                append(out, cap, &len, "::", 2);
            append(out, cap, &len, "std", 3);
            s += 2;
        } else if ((n = source_name(&s))) {
            if (!(n == 12 && !strncmp(s, "_GLOBAL__N_1", 12))) { /* the anonymous namespace */
                if (parts++)
                    append(out, cap, &len, "::", 2);
                append(out, cap, &len, s, n);
            }
            s += n;
        } else {
            break;
        }
        if (!nested)
            break;
    }
    if (!parts) { /* not a form read here: the name as it is */
        snprintf(out, cap, "%s", name);
        return;
    }
    if (*s != 'I')
        return;
    /* template arguments: up to three of the identifiers inside (types,
     * policies: a library kernel's identity is often there) */
    append(out, cap, &len, "<", 1);
    int k = 0;
    for (const char *q = s + 1; *q && k < 3;) {
        const char *r = q;
        size_t n;
        if ((q == s + 1 || !isdigit((unsigned char)q[-1])) && (n = source_name(&r)) && n >= 3) {
            if (k++)
                append(out, cap, &len, ", ", 2);
            append(out, cap, &len, r, n);
            q = r + n;
        } else {
            q++;
        }
    }
    append(out, cap, &len, k ? ">" : "...>", k ? 1 : 4);
}

/* our kernels (kernels/cuda/) by identifier prefix, then the libraries' by substring */
static const struct {
    const char *prefix, *cat;
} ours[] = {
    {"round_kernel", "ours: 16-bit conversions"},        {"to16_kernel", "ours: 16-bit conversions"},
    {"from16_kernel", "ours: 16-bit conversions"},       {"bias_fill16_kernel", "ours: 16-bit conversions"},
    {"to16_nhwc", "ours: 16-bit conversions"},           {"from16_nchw", "ours: 16-bit conversions"},
    {"attention", "ours: attention"},                    {"attn_", "ours: attention"},
    {"softmax_", "ours: attention"},                     {"groupnorm_", "ours: norms"},
    {"layernorm_", "ours: norms"},                       {"adamw", "ours: optimizer and clipping"},
    {"sumsq_", "ours: optimizer and clipping"},          {"scale_kernel", "ours: optimizer and clipping"},
    {"clip_", "ours: optimizer and clipping"},
    {"linear_epilogue_kernel", "ours: bias and epilogues"},
    {"linear_geglu_epilogue_kernel", "ours: bias and epilogues"},
    {"bias_", "ours: bias and epilogues"},               {"add_channel", "ours: bias and epilogues"},
    {"colsum_part_kernel", "ours: bias and epilogues"},  {"finish_colsum_kernel", "ours: bias and epilogues"},
    {"act_", "ours: elementwise and layout"},            {"binary_kernel", "ours: elementwise and layout"},
    {"geglu_", "ours: elementwise and layout"},          {"concat", "ours: elementwise and layout"},
    {"crop_kernel", "ours: elementwise and layout"},     {"pad_kernel", "ours: elementwise and layout"},
    {"upsample", "ours: elementwise and layout"},        {"transpose_kernel", "ours: elementwise and layout"},
    {"embedding", "ours: elementwise and layout"},       {"timestep_kernel", "ours: elementwise and layout"},
    {"check_tokens_kernel", "ours: elementwise and layout"},
    {"mul_backward_kernel", "ours: elementwise and layout"},
    {"axpy_kernel", "ours: elementwise and layout"},
};

static int has(const char *hay, const char *needle)
{
    const size_t n = strlen(needle);
    for (; *hay; hay++)
        if (!strncasecmp(hay, needle, n))
            return 1;
    return 0;
}

const char *kp_category(const char *readable)
{
    if (readable[0] == '[')
        return "copies and memsets";
    /* our kernels by their own name: past the namespaces (those of a .cu's
     * anonymous namespace read _GLOBAL__N__<hash>_<file>_<hash>::) */
    const char *base = readable, *lt = strchr(readable, '<');
    for (const char *p = readable; *p && (!lt || p < lt); p++)
        if (p[0] == ':' && p[1] == ':')
            base = p + 2;
    for (size_t i = 0; i < sizeof ours / sizeof ours[0]; i++)
        if (!strncmp(base, ours[i].prefix, strlen(ours[i].prefix)))
            return ours[i].cat;
    if ((has(readable, "nchw") && has(readable, "nhwc")) || has(readable, "nchwToNhwc") ||
        has(readable, "nhwcToNchw") || has(readable, "transpose"))
        return "library layout transposes";
    if (has(readable, "conv") || has(readable, "fprop") || has(readable, "dgrad") || has(readable, "wgrad") ||
        has(readable, "winograd") || has(readable, "implicit"))
        return "cuDNN convolution";
    if (has(readable, "gemm") || has(readable, "nvjet") || has(readable, "gemv") || has(readable, "cublas") ||
        has(readable, "splitk"))
        return "cuBLAS GEMM";
    if (has(readable, "cudnn"))
        return "cuDNN other";
    return "other";
}

/* ---- report ------------------------------------------------------------------------------ */

typedef struct row {
    const char *name; /* readable (kernel rows) or category */
    const char *cat;
    uint64_t ns, n;
    const char *cfg; /* kernel rows: the first launch's configuration, or NULL */
} row;

static int by_time(const void *a, const void *b)
{
    const row *x = a, *y = b;
    return (x->ns < y->ns) - (x->ns > y->ns);
}

static void clean(char *s) /* a markdown cell */
{
    for (; *s; s++)
        if (*s == '|' || *s == '\n')
            *s = '/';
}

static int by_start(const void *a, const void *b)
{
    const kp_rec *x = *(const kp_rec *const *)a, *y = *(const kp_rec *const *)b;
    return (x->start > y->start) - (x->start < y->start);
}

/* Where the GPU waited on the host inside [t0, t1): the stretches with no
 * GPU record running, between the first record's start and the last one's
 * end.  The total and count of those over GAP_MIN_NS per call, then the
 * longest GAP_TOP with the records around them and, where host API calls
 * were recorded (kp_add_host), the calls that cover the stretch (a sync, a
 * copy from pageable memory, a graph launch) and how much of it no CUDA
 * call covers (host work). */
enum { GAP_TOP = 8, GAP_CALLS = 3, HOST_TOP = 10 };
static const uint64_t GAP_MIN_NS = 10000;

static uint64_t overlap(const kp_rec *h, uint64_t a, uint64_t b)
{
    const uint64_t s = h->start > a ? h->start : a, e = h->end < b ? h->end : b;
    return e > s ? e - s : 0;
}

/* What the host calls did in [a, b): the GAP_CALLS names that cover the
 * most of it (us each), and the time no call covers, into out. */
static void covered(const kp_rec **h, size_t nh, uint64_t a, uint64_t b, char (*readable)[160], char *out,
                    size_t cap)
{
    struct {
        uint32_t name;
        uint64_t ns;
    } top[GAP_CALLS] = {{0, 0}};
    uint64_t reach = a, uncovered = 0; /* h is sorted by start: the union's gaps */
    for (size_t i = 0; i < nh; i++) {
        const uint64_t o = overlap(h[i], a, b);
        if (!o)
            continue;
        const uint64_t s = h[i]->start > a ? h[i]->start : a;
        if (s > reach)
            uncovered += s - reach;
        if (h[i]->end > reach)
            reach = h[i]->end < b ? h[i]->end : b;
        uint64_t sum = 0; /* this name's total in [a, b) */
        int seen = 0;
        for (int k = 0; k < GAP_CALLS; k++)
            if (top[k].ns && top[k].name == h[i]->name)
                seen = 1;
        if (seen)
            continue;
        for (size_t j = i; j < nh && h[j]->start < b; j++)
            if (h[j]->name == h[i]->name)
                sum += overlap(h[j], a, b);
        int k = GAP_CALLS - 1;
        if (sum > top[k].ns) {
            while (k > 0 && sum > top[k - 1].ns) {
                top[k] = top[k - 1];
                k--;
            }
            top[k].name = h[i]->name, top[k].ns = sum;
        }
    }
    if (b > reach)
        uncovered += b - reach;
    size_t n = 0;
    out[0] = 0;
    for (int k = 0; k < GAP_CALLS && top[k].ns && n < cap; k++)
        n += (size_t)snprintf(out + n, cap - n, "%s%s %.1f", k ? "; " : "", readable[top[k].name],
                              1e-3 * (double)top[k].ns);
    if (n < cap)
        snprintf(out + n, cap - n, "%sno CUDA call %.1f", n ? "; " : "", 1e-3 * (double)uncovered);
}

static void gaps(const kp_prof *p, FILE *f, uint64_t t0, uint64_t t1, double per, char (*readable)[160])
{
    size_t n = 0, nh = 0;
    for (size_t i = 0; i < p->nr; i++)
        if (p->rec[i].start >= t0 && p->rec[i].start < t1)
            p->rec[i].host ? nh++ : n++;
    const kp_rec **r = malloc((n + nh + 1) * sizeof *r), **h = r + n;
    if (!r)
        return;
    n = nh = 0;
    for (size_t i = 0; i < p->nr; i++)
        if (p->rec[i].start >= t0 && p->rec[i].start < t1) {
            if (p->rec[i].host)
                h[nh++] = &p->rec[i];
            else
                r[n++] = &p->rec[i];
        }
    qsort(r, n, sizeof *r, by_start);
    qsort(h, nh, sizeof *h, by_start);
    struct {
        uint64_t ns;
        const kp_rec *before, *after;
    } g[GAP_TOP] = {{0, NULL, NULL}};
    uint64_t total = 0, cnt = 0;
    const kp_rec *last = n ? r[0] : NULL; /* the record that ends latest so far */
    for (size_t i = 1; i < n; i++) {
        if (r[i]->start > last->end) {
            const uint64_t d = r[i]->start - last->end;
            if (d >= GAP_MIN_NS)
                total += d, cnt++;
            int k = GAP_TOP - 1;
            if (d > g[k].ns) {
                while (k > 0 && d > g[k - 1].ns) {
                    g[k] = g[k - 1];
                    k--;
                }
                g[k].ns = d, g[k].before = last, g[k].after = r[i];
            }
        }
        if (r[i]->end > last->end)
            last = r[i];
    }
    fprintf(f, "\nIdle stretches of %.0f us or more: %.1f per call, %.3f ms per call in all\n",
            1e-3 * (double)GAP_MIN_NS, (double)cnt * per, 1e-6 * (double)total * per);
    if (g[0].ns) {
        fprintf(f, "\n| idle (longest, all calls) | us | last record before | first record after |%s\n"
                   "|---|---:|---|---|%s\n",
                nh ? " host calls in it (us) |" : "", nh ? "---|" : "");
        for (int k = 0; k < GAP_TOP && g[k].ns; k++) {
            char calls[512] = "";
            if (nh)
                covered(h, nh, g[k].before->end, g[k].after->start, readable, calls, sizeof calls);
            fprintf(f, "| %d | %.1f | %s | %s |%s%s%s\n", k + 1, 1e-3 * (double)g[k].ns, readable[g[k].before->name],
                    readable[g[k].after->name], nh ? " " : "", calls, nh ? " |" : "");
        }
    }
    free(r);
}

static void section(const kp_prof *p, FILE *f, const char *label, uint64_t t0, uint64_t t1, int calls, int top,
                    char (*readable)[160], const char **cats)
{
    row *k = calloc(p->nn ? p->nn : 1, sizeof *k), *c = calloc(p->nn + 1, sizeof *c),
        *h = calloc(p->nn ? p->nn : 1, sizeof *h);
    if (!k || !c || !h) {
        fprintf(f, "\n### kernel profile: %s: out of memory for the report\n", label);
        free(k), free(c), free(h);
        return;
    }
    uint64_t busy = 0, n = 0, nh = 0;
    for (size_t i = 0; i < p->nr; i++) {
        const kp_rec *r = &p->rec[i];
        if (r->start < t0 || r->start >= t1)
            continue;
        if (r->host) {
            h[r->name].ns += r->end - r->start, h[r->name].n++, nh++;
            continue;
        }
        k[r->name].ns += r->end - r->start, k[r->name].n++;
        busy += r->end - r->start, n++;
    }
    if (!n) {
        fprintf(f, "\n### kernel profile: %s\n\n%d call%s; no kernels recorded in them\n", label, calls,
                calls == 1 ? "" : "s");
        free(k), free(c), free(h);
        return;
    }
    size_t nk = 0, nc = 0;
    for (size_t i = 0; i < p->nn; i++) {
        if (!k[i].n)
            continue;
        size_t j = 0;
        while (j < nc && strcmp(c[j].name, cats[i]))
            j++;
        if (j == nc)
            c[nc++] = (row){cats[i], cats[i], 0, 0, NULL};
        c[j].ns += k[i].ns, c[j].n += k[i].n;
        k[nk++] = (row){readable[i], cats[i], k[i].ns, k[i].n, p->cfgs[i]};
    }
    qsort(k, nk, sizeof *k, by_time);
    qsort(c, nc, sizeof *c, by_time);
    const double per = 1.0 / (calls < 1 ? 1 : calls), wall = 1e-6 * (double)(t1 - t0) * per;
    fprintf(f, "\n### kernel profile: %s\n\n%d call%s; per call: %.3f ms wall, %.3f ms of GPU work (%.0f%% of the "
               "wall; the rest is the GPU waiting on the host), %.1f launches\n\n",
            label, calls, calls == 1 ? "" : "s", wall, 1e-6 * (double)busy * per,
            wall > 0 ? 100.0 * 1e-6 * (double)busy * per / wall : 0.0, (double)n * per);
    fprintf(f, "| category | ms per call | share | launches per call |\n|---|---:|---:|---:|\n");
    for (size_t j = 0; j < nc; j++)
        fprintf(f, "| %s | %.3f | %.1f%% | %.1f |\n", c[j].name, 1e-6 * (double)c[j].ns * per,
                busy ? 100.0 * (double)c[j].ns / (double)busy : 0.0, (double)c[j].n * per);
    fprintf(f, "\n| kernel (top %d by time) | category | ms per call | share | launches per call | us each | "
               "first launch: grid x block |\n|---|---|---:|---:|---:|---:|---|\n", top);
    for (size_t j = 0; j < nk && (int)j < top; j++)
        fprintf(f, "| %s | %s | %.3f | %.1f%% | %.1f | %.1f | %s |\n", k[j].name, k[j].cat,
                1e-6 * (double)k[j].ns * per, busy ? 100.0 * (double)k[j].ns / (double)busy : 0.0,
                (double)k[j].n * per, 1e-3 * (double)k[j].ns / (double)k[j].n, k[j].cfg ? k[j].cfg : "");
    if (nk > (size_t)top)
        fprintf(f, "| (%zu more kernels) | | | | | | |\n", nk - (size_t)top);
    if (nh) { /* the host's CUDA calls, by time */
        size_t m = 0;
        for (size_t i = 0; i < p->nn; i++)
            if (h[i].n)
                h[m++] = (row){readable[i], "host", h[i].ns, h[i].n, NULL};
        qsort(h, m, sizeof *h, by_time);
        fprintf(f, "\n| host CUDA call (top %d by time) | ms per call | calls per call | us each |\n"
                   "|---|---:|---:|---:|\n", HOST_TOP);
        for (size_t j = 0; j < m && j < HOST_TOP; j++)
            fprintf(f, "| %s | %.3f | %.1f | %.1f |\n", h[j].name, 1e-6 * (double)h[j].ns * per,
                    (double)h[j].n * per, 1e-3 * (double)h[j].ns / (double)h[j].n);
    }
    gaps(p, f, t0, t1, per, readable);
    free(k), free(c), free(h);
}

void kp_report(const kp_prof *p, FILE *f, const char *whole, int top)
{
    char (*readable)[160] = calloc(p->nn ? p->nn : 1, sizeof *readable);
    const char **cats = calloc(p->nn ? p->nn : 1, sizeof *cats);
    if (!readable || !cats) {
        fprintf(f, "\n### kernel profile: out of memory for the report\n");
        free(readable), free(cats);
        return;
    }
    for (size_t i = 0; i < p->nn; i++) {
        kp_readable(p->names[i], readable[i], sizeof readable[i]);
        clean(readable[i]);
        cats[i] = kp_category(readable[i]);
    }
    top = top < 1 ? 20 : top;
    if (p->ns) {
        for (size_t s = 0; s < p->ns; s++) {
            const kp_sec *q = &p->sec[s];
            /* a section still open at the end runs to the last record */
            uint64_t t1 = q->t1;
            if (p->open && s == p->ns - 1)
                for (size_t i = 0; i < p->nr; i++)
                    if (!p->rec[i].host)
                        t1 = p->rec[i].end + 1 > t1 ? p->rec[i].end + 1 : t1;
            section(p, f, q->label, q->t0, t1, q->calls ? q->calls : 1, top, readable, cats);
        }
    } else if (p->nr) {
        uint64_t t0 = UINT64_MAX, t1 = 0;
        for (size_t i = 0; i < p->nr; i++) {
            if (p->rec[i].host)
                continue;
            t0 = p->rec[i].start < t0 ? p->rec[i].start : t0;
            t1 = p->rec[i].end + 1 > t1 ? p->rec[i].end + 1 : t1;
        }
        section(p, f, whole && *whole ? whole : "whole run", t0, t1, 1, top, readable, cats);
    } else {
        fprintf(f, "\n### kernel profile: %s: no kernels recorded\n", whole && *whole ? whole : "whole run");
    }
    if (p->lost)
        fprintf(f, "\n(%lu records lost: the tables above miss them)\n", p->lost);
    free(readable), free(cats);
}

void kp_free(kp_prof *p)
{
    for (size_t i = 0; i < p->nn; i++)
        free(p->names[i]), free(p->cfgs[i]);
    free(p->names), free(p->cfgs), free(p->hash), free(p->rec), free(p->sec);
    memset(p, 0, sizeof *p);
}
