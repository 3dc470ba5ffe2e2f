/* AdamW, gradient-norm clipping and lr schedules; see optim.h for the
 * torch / diffusers formulas each function follows. */
#include "libcommon/sd/optim.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/core/tensor.h"
#include "libcommon/sd/adamw_coef.h"

/* element i of a packed gradient (DB_ASSIGN_PACK16's bits of prec16) */
static inline float packed_at(const uint16_t *g, size_t i, int prec16)
{
    return prec16 == DB_PREC_F16 ? db_f16_to_f32(g[i]) : db_bf16_to_f32(g[i]);
}

db_adamw db_adamw_defaults(double lr)
{
    return (db_adamw){.lr = lr, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 1e-2};
}

/* The step's float32 scalars come from db_adamw_coefs (adamw_coef.h), shared with
 * the CUDA step (kernels/cuda/optim.cu) so both use the same bits.
 *
 * One element, in torch's operation order; every intermediate is a float
 * (GCC's -std=c11 implies -ffp-contract=off, so no FMA is formed). */
static inline void adamw_elem(float *p, float *m, float *v, float g, const db_adamw_coef *c)
{
    if (c->grad_coef != 0.0f) /* clipping's scaling, folded in (optim.h grad_coef) */
        g = g * c->grad_coef;
    float pi = *p * c->decay;
    float mi = *m * c->b1;
    mi = mi + c->one_minus_b1 * g;
    float vi = *v * c->b2;
    vi = vi + c->one_minus_b2 * g * g; /* addcmul: self + (value * t1) * t2 */
    float d = sqrtf(vi) / c->bc2_sqrt;
    d = d + c->eps;
    pi = pi + c->neg_step_size * mi / d; /* addcdiv: self + (value * t1) / t2 */
    *p = pi;
    *m = mi;
    *v = vi;
}

/* Elements [lo, hi) of the step: g's floats, or (g16) the packed values of
 * a tensor starting at lo (db_adamw.g16_runs) */
static void adamw_span(float *p, float *m, float *v, const float *g, const uint16_t *g16, int prec16, size_t lo,
                       size_t hi, const db_adamw_coef *c, int omp)
{
    const ptrdiff_t a = (ptrdiff_t)lo, b = (ptrdiff_t)hi;
#pragma omp parallel for schedule(static) if (omp && b - a > 16384)
    for (ptrdiff_t i = a; i < b; i++)
        adamw_elem(&p[i], &m[i], &v[i], g16 ? packed_at(g16, (size_t)(i - a), prec16) : g[i], c);
}

/* the step over [0, n), its packed tensors (hp's runs) read as such */
static void adamw_runs(float *p, float *m, float *v, const float *g, size_t n, const db_adamw *hp, int64_t t,
                       int omp)
{
    const db_adamw_coef c = db_adamw_coefs_host(hp, t);
    size_t at = 0;
    for (size_t k = 0; k < hp->g16_nruns && at < n; k++) {
        const size_t lo = hp->g16_runs[2 * k], hi = hp->g16_runs[2 * k + 1] < n ? hp->g16_runs[2 * k + 1] : n;
        if (lo > at)
            adamw_span(p, m, v, g, NULL, 0, at, lo < n ? lo : n, &c, omp);
        if (lo < hi)
            adamw_span(p, m, v, g, (const uint16_t *)(const void *)(g + lo), hp->g16_prec, lo, hi, &c, omp);
        at = hi > at ? hi : at;
    }
    if (at < n)
        adamw_span(p, m, v, g, NULL, 0, at, n, &c, omp);
}

void db_adamw_step(float *p, float *m, float *v, const float *g, size_t n, const db_adamw *hp, int64_t t)
{
    adamw_runs(p, m, v, g, n, hp, t, 0);
}

void db_adamw_step_omp(float *p, float *m, float *v, const float *g, size_t n, const db_adamw *hp, int64_t t)
{
    adamw_runs(p, m, v, g, n, hp, t, 1);
}

/* ---- 8-bit AdamW ------------------------------------------------------------------ */

void db_q8_map_make(db_q8_map *map, int is_signed)
{
    /* bnb's create_dynamic_map with max_exponent_bits 7, total_bits 8:
     * non_sign_bits = 7, no "additional items"; exponent i = 0..6 scales the
     * midpoints of F = 2^i + 1 (signed) or 2^(i+1) + 1 (unsigned) points
     * evenly spaced over [0.1, 1] by 10^(i-6).  Midpoint j of linspace is
     * 0.1 + 0.9 (j + 1/2) / (F - 1), exactly, in double. */
    float v[256];
    int n = 0;
    for (int i = 0; i < 7; i++) {
        const int F = is_signed ? (1 << i) + 1 : (1 << (i + 1)) + 1;
        const double scale = pow(10.0, (double)(i - 6));
        for (int j = 0; j < F - 1; j++) {
            const double mean = 0.1 + 0.9 * ((double)j + 0.5) / (double)(F - 1);
            v[n++] = (float)(scale * mean);
            if (is_signed)
                v[n++] = (float)(-scale * mean);
        }
    }
    v[n++] = 0.0f;
    v[n++] = 1.0f;
    /* n == 256 for both kinds: 2 (1 + 2 + ... + 64) + 2 and (2 + 4 + ... + 128) + 2.
     * Sorted by insertion (256 items, once): no qsort callback needed. */
    for (int a = 1; a < n; a++) {
        const float x = v[a];
        int b = a;
        for (; b > 0 && v[b - 1] > x; b--)
            v[b] = v[b - 1];
        v[b] = x;
    }
    for (int k = 0; k < 256; k++)
        map->code[k] = v[k];
    for (int k = 0; k < 255; k++)
        map->mid[k] = (map->code[k] + map->code[k + 1]) * 0.5f;
}

void db_q8_maps_make(db_q8_maps *maps)
{
    db_q8_map_make(&maps->m, 1);
    db_q8_map_make(&maps->v, 0);
}

/* One value's code: the nearest code to x / absmax, bnb's sign rule for
 * exp_avg.  kernels/cuda/optim.cu's q8_code is this, operation for
 * operation. */
static inline uint8_t q8_code(float x, float absmax, const db_q8_map *map, int signed_fix)
{
    const float r = absmax > 0.0f ? x / absmax : 0.0f;
    int c = db_q8_nearest(map->mid, r);
    if (signed_fix && signbit(map->code[c]) != signbit(x))
        c += x > 0.0f ? 1 : -1;
    return (uint8_t)c; /* bnb's unsigned char arithmetic: only c = 127 -> 126 happens for finite x */
}

void db_q8_quantize(uint8_t *q, float *absmax, const float *x, size_t n, const db_q8_map *map, int signed_fix)
{
    for (size_t b = 0; b * DB_Q8_BLOCK < n; b++) {
        const size_t beg = b * DB_Q8_BLOCK, end = beg + DB_Q8_BLOCK < n ? beg + DB_Q8_BLOCK : n;
        float mx = 0.0f;
        for (size_t i = beg; i < end; i++)
            mx = fmaxf(mx, fabsf(x[i]));
        absmax[b] = mx;
        for (size_t i = beg; i < end; i++)
            q[i] = q8_code(x[i], mx, map, signed_fix);
    }
}

void db_q8_dequantize(float *x, const uint8_t *q, const float *absmax, size_t n, const db_q8_map *map)
{
    for (size_t i = 0; i < n; i++)
        x[i] = map->code[q[i]] * absmax[i / DB_Q8_BLOCK];
}

/* One quantisation block [beg, end) of the 8-bit step: dequantise, the
 * element update of adamw_elem (the same operations in the same order),
 * the new scales, requantise.  The moments of the block sit in two
 * DB_Q8_BLOCK-float stack arrays between the passes.  The maxima use
 * fmaxf, which is exact, commutative and associative (and ignores NaN), so
 * the CUDA kernel's tree reduction gives the same scale. */
static void adamw8_block(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax, const float *g,
                         const uint16_t *g16, int prec16, size_t beg, size_t end, const db_adamw_coef *c,
                         const db_q8_maps *maps)
{
    float m[DB_Q8_BLOCK], v[DB_Q8_BLOCK];
    const size_t b = beg / DB_Q8_BLOCK, k = end - beg;
    const float am = m_absmax[b], av = v_absmax[b];
    float mx_m = 0.0f, mx_v = 0.0f;
    for (size_t j = 0; j < k; j++) {
        const size_t i = beg + j;
        float mi = maps->m.code[m_q[i]] * am;
        float vi = maps->v.code[v_q[i]] * av;
        adamw_elem(&p[i], &mi, &vi, g16 ? packed_at(g16, i, prec16) : g[i], c);
        m[j] = mi;
        v[j] = vi;
        mx_m = fmaxf(mx_m, fabsf(mi));
        mx_v = fmaxf(mx_v, fabsf(vi));
    }
    m_absmax[b] = mx_m;
    v_absmax[b] = mx_v;
    for (size_t j = 0; j < k; j++) {
        m_q[beg + j] = q8_code(m[j], mx_m, &maps->m, 1);
        v_q[beg + j] = q8_code(v[j], mx_v, &maps->v, 0);
    }
}

void db_adamw8bit_step(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax, const float *g,
                       size_t n, const db_adamw *hp, int64_t t, const db_q8_maps *maps)
{
    const db_adamw_coef c = db_adamw_coefs_host(hp, t);
    for (size_t beg = 0; beg < n; beg += DB_Q8_BLOCK)
        adamw8_block(p, m_q, v_q, m_absmax, v_absmax, g, NULL, 0, beg, beg + DB_Q8_BLOCK < n ? beg + DB_Q8_BLOCK : n,
                     &c, maps);
}

/* the threaded step over g (float32) or g16 (packed, prec16) */
static void adamw8bit_omp(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax, const float *g,
                          const uint16_t *g16, int prec16, size_t n, const db_adamw *hp, int64_t t,
                          const db_q8_maps *maps)
{
    const db_adamw_coef c = db_adamw_coefs_host(hp, t);
    const ptrdiff_t nb = (ptrdiff_t)((n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK);
#pragma omp parallel for schedule(static) if (nb > 64)
    for (ptrdiff_t b = 0; b < nb; b++) {
        const size_t beg = (size_t)b * DB_Q8_BLOCK;
        adamw8_block(p, m_q, v_q, m_absmax, v_absmax, g, g16, prec16, beg,
                     beg + DB_Q8_BLOCK < n ? beg + DB_Q8_BLOCK : n, &c, maps);
    }
}

void db_adamw8bit_step_omp(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                           const float *g, size_t n, const db_adamw *hp, int64_t t, const db_q8_maps *maps)
{
    adamw8bit_omp(p, m_q, v_q, m_absmax, v_absmax, g, NULL, 0, n, hp, t, maps);
}

void db_adamw8bit_step16_omp(float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax, float *v_absmax,
                             const uint16_t *g, int prec16, size_t n, const db_adamw *hp, int64_t t,
                             const db_q8_maps *maps)
{
    adamw8bit_omp(p, m_q, v_q, m_absmax, v_absmax, NULL, g, prec16, n, hp, t, maps);
}

int db_optim_parse(const char *name, db_optim_kind *out)
{
    if (name && strcmp(name, "adamw") == 0)
        *out = DB_OPTIM_ADAMW;
    else if (name && strcmp(name, "adamw8bit") == 0)
        *out = DB_OPTIM_ADAMW8BIT;
    else
        return -1;
    return 0;
}

const char *db_optim_name(db_optim_kind kind)
{
    return kind == DB_OPTIM_ADAMW ? "adamw" : kind == DB_OPTIM_ADAMW8BIT ? "adamw8bit" : "?";
}

size_t db_optim_state_bytes(db_optim_kind kind, size_t n)
{
    if (kind != DB_OPTIM_ADAMW8BIT || n < DB_Q8_MIN_SIZE)
        return 8 * n;
    return 2 * n + 2 * sizeof(float) * ((n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK);
}

/* ---- clipping ------------------------------------------------------------ */

/* The chunk is part of the result's bits: kernels/cuda/optim.cu uses the
 * same 4096 (and the same order) so the CUDA sum is bit-identical. */
enum { CLIP_CHUNK = 4096 };

/* Sum of squares of one tensor: fixed chunks, each summed in double in
 * element order, the chunk partials then added in chunk order, so threads
 * only decide who computes a chunk, never how the sum associates. */
/* element i of g (float32), or of g16 (packed, prec16) when g is NULL */
static inline double grad_at(const float *g, const uint16_t *g16, int prec16, size_t i)
{
    return g ? (double)g[i] : (double)packed_at(g16, i, prec16);
}

/* elements [beg, end) squared and summed in order, in double */
static double sumsq_span(const float *g, const uint16_t *g16, int prec16, size_t beg, size_t end)
{
    double s = 0.0;
    for (size_t i = beg; i < end; i++) {
        const double x = grad_at(g, g16, prec16, i);
        s += x * x;
    }
    return s;
}

static double sum_squares(const float *g, const uint16_t *g16, int prec16, size_t n)
{
    size_t nchunks = (n + CLIP_CHUNK - 1) / CLIP_CHUNK;
    if (nchunks <= 1)
        return sumsq_span(g, g16, prec16, 0, n);
    double *part = malloc(nchunks * sizeof *part);
    if (!part) { /* same association, just serial */
        double total = 0.0;
        for (size_t c = 0; c < nchunks; c++) {
            size_t end = c * CLIP_CHUNK + CLIP_CHUNK < n ? c * CLIP_CHUNK + CLIP_CHUNK : n;
            total += sumsq_span(g, g16, prec16, c * CLIP_CHUNK, end);
        }
        return total;
    }
    ptrdiff_t nc = (ptrdiff_t)nchunks;
#pragma omp parallel for schedule(static) if (nc > 4)
    for (ptrdiff_t c = 0; c < nc; c++) {
        size_t beg = (size_t)c * CLIP_CHUNK, end = beg + CLIP_CHUNK < n ? beg + CLIP_CHUNK : n;
        part[c] = sumsq_span(g, g16, prec16, beg, end);
    }
    double total = 0.0;
    for (size_t c = 0; c < nchunks; c++)
        total += part[c];
    free(part);
    return total;
}

double db_sum_squares(const float *g, size_t n) { return sum_squares(g, NULL, 0, n); }

double db_sum_squares16(const uint16_t *g, size_t n, int prec16) { return sum_squares(NULL, g, prec16, n); }

void db_scale(float *g, float coef, size_t n)
{
    ptrdiff_t nn = (ptrdiff_t)n;
#pragma omp parallel for schedule(static) if (nn > 16384)
    for (ptrdiff_t i = 0; i < nn; i++)
        g[i] = g[i] * coef;
}

/* torch: per-tensor float32 norms, stacked, and the norm of the stack; the
 * clip coefficient from it.  ss accumulates (double)nk^2 in tensor order. */
static float clip_total(double ss) { return (float)sqrt(ss); }
static float clip_coef(double max_norm, float total) { return (float)max_norm / (total + 1e-6f); }
/* torch multiplies by clamp(coef, max=1): 1 is a no-op, and clamp propagates
 * NaN, so a NaN coefficient poisons every gradient as in torch. */
static int clip_scales(float coef) { return coef < 1.0f || isnan(coef); }

double db_clip_grad_norm(const db_grad_ref *grads, size_t ngrads, double max_norm)
{
    if (ngrads == 0)
        return 0.0; /* torch returns tensor(0.) for no gradients */
    double ss = 0.0;
    for (size_t k = 0; k < ngrads; k++) {
        float nk = (float)sqrt(db_sum_squares(grads[k].g, grads[k].n));
        ss += (double)nk * (double)nk;
    }
    float total = clip_total(ss);
    float coef = clip_coef(max_norm, total);
    if (clip_scales(coef))
        for (size_t k = 0; k < ngrads; k++)
            db_scale(grads[k].g, coef, grads[k].n);
    return (double)total;
}

/* the first packed tensor of grads, or NULL */
static const db_grad_ref *first_packed(const db_grad_ref *grads, size_t ngrads)
{
    for (size_t k = 0; k < ngrads; k++)
        if (grads[k].prec16)
            return &grads[k];
    return NULL;
}

int db_scale_refs_ctx(db_ctx *c, const db_grad_ref *grads, size_t ngrads, float coef)
{
    if (first_packed(grads, ngrads))
        return db_err_set(&c->err, DB_EUSAGE, "clip: packed 16-bit gradients cannot be scaled in place");
    for (size_t k = 0; k < ngrads;) {
        float *g = grads[k].g;
        size_t n = grads[k].n, j = k + 1;
        while (j < ngrads && grads[j].g == g + n) /* the next tensor starts where this run ends */
            n += grads[j++].n;
        if (db_opt_scale(c, g, coef, n))
            return -1;
        k = j;
    }
    return 0;
}

int db_sumsq_refs_ctx(db_ctx *c, double *ss, const db_grad_ref *grads, size_t ngrads)
{
    const float **g = malloc(ngrads * sizeof *g);
    size_t *n = malloc(ngrads * sizeof *n);
    int *p = malloc(ngrads * sizeof *p);
    int rc = -1;
    if (g && n && p) {
        for (size_t k = 0; k < ngrads; k++)
            g[k] = grads[k].g, n[k] = grads[k].n, p[k] = grads[k].prec16;
        rc = db_opt_sumsq_many(c, ss, g, n, first_packed(grads, ngrads) ? p : NULL, ngrads);
    } else
        db_err_set(&c->err, DB_ENOMEM, "clip: out of memory for %zu tensors", ngrads);
    free(g);
    free(n);
    free(p);
    return rc;
}

int db_clip_grad_norm_ctx(db_ctx *c, double *norm, const db_grad_ref *grads, size_t ngrads, double max_norm)
{
    /* the measure, then the scaling the AdamW step would otherwise fold in */
    float coef;
    if (db_clip_grad_coef_ctx(c, norm, &coef, grads, ngrads, max_norm))
        return -1;
    return coef != 0.0f && db_scale_refs_ctx(c, grads, ngrads, coef) ? -1 : 0;
}

int db_clip_grad_coef_ctx(db_ctx *c, double *norm, float *coef, const db_grad_ref *grads, size_t ngrads,
                          double max_norm)
{
    *norm = 0.0;
    *coef = 0.0f;
    if (ngrads == 0)
        return 0;
    double *sk = malloc(ngrads * sizeof *sk);
    if (!sk)
        return db_err_set(&c->err, DB_ENOMEM, "clip: out of memory for %zu tensors", ngrads);
    if (db_sumsq_refs_ctx(c, sk, grads, ngrads)) {
        free(sk);
        return -1;
    }
    double ss = 0.0;
    for (size_t k = 0; k < ngrads; k++) {
        float nk = (float)sqrt(sk[k]);
        ss += (double)nk * (double)nk;
    }
    free(sk);
    const float total = clip_total(ss), q = clip_coef(max_norm, total);
    *norm = (double)total;
    if (!clip_scales(q))
        return 0;
    if (q > 0.0f && isfinite(q)) { /* the step multiplies */
        *coef = q;
        return 0;
    }
    /* 0 or NaN (a non-finite norm) cannot ride in grad_coef: scaled here;
     * packed gradients cannot be, and a NaN in grad_coef poisons the step
     * as the scaling would (0 comes only from a maximum of 0) */
    if (isnan(q) && first_packed(grads, ngrads)) {
        *coef = q;
        return 0;
    }
    return db_scale_refs_ctx(c, grads, ngrads, q);
}

float db_clip_one_coef(double ss, float max_norm, float *norm)
{
    /* clip_grad_norm_ of one tensor: its norm is the total */
    const float nk = (float)sqrt(ss), total = clip_total((double)nk * (double)nk);
    const float coef = clip_coef(max_norm, total);
    *norm = total;
    return clip_scales(coef) ? coef : 1.0f;
}

int db_clip_grad_norm_each_ctx(db_ctx *c, double *norms, double *ss, const db_grad_ref *grads, size_t ngrads,
                               double max_norm)
{
    if (ngrads == 0)
        return 0;
    if (first_packed(grads, ngrads))
        return db_err_set(&c->err, DB_EUSAGE, "clip: packed 16-bit gradients cannot be clipped per tensor");
    if (db_sumsq_refs_ctx(c, norms, grads, ngrads))
        return -1;
    for (size_t k = 0; k < ngrads; k++) {
        float nk;
        const float coef = db_clip_one_coef(norms[k], (float)max_norm, &nk);
        if (coef != 1.0f && db_opt_scale(c, grads[k].g, coef, grads[k].n))
            return -1;
        norms[k] = (double)nk;
        *ss += (double)nk * (double)nk;
    }
    return 0;
}

/* ---- learning-rate schedules ----------------------------------------------- */

static const char *const lr_names[] = {
    [DB_LR_CONSTANT] = "constant",
    [DB_LR_CONSTANT_WITH_WARMUP] = "constant_with_warmup",
    [DB_LR_LINEAR] = "linear",
    [DB_LR_COSINE] = "cosine",
    [DB_LR_COSINE_WITH_RESTARTS] = "cosine_with_restarts",
    [DB_LR_POLYNOMIAL] = "polynomial",
};

int db_lr_kind_parse(const char *name, db_lr_kind *out)
{
    for (size_t k = 0; k < sizeof lr_names / sizeof lr_names[0]; k++)
        if (name && strcmp(name, lr_names[k]) == 0) {
            *out = (db_lr_kind)k;
            return 0;
        }
    return -1;
}

const char *db_lr_kind_name(db_lr_kind kind)
{
    return (unsigned)kind < sizeof lr_names / sizeof lr_names[0] ? lr_names[kind] : "?";
}

db_lr_schedule db_lr_schedule_make(db_lr_kind kind, double base_lr, int64_t warmup_steps, int64_t training_steps)
{
    return (db_lr_schedule){
        .kind = kind,
        .base_lr = base_lr,
        .warmup_steps = warmup_steps,
        .training_steps = training_steps,
        .num_cycles = kind == DB_LR_COSINE_WITH_RESTARTS ? 1.0 : 0.5,
        .lr_end = 1e-7,
        .power = 1.0,
    };
}

static int64_t max64(int64_t a, int64_t b)
{
    return a > b ? a : b;
}

/* diffusers' lr_lambda(current_step), in Python float (double) semantics. */
static double lr_lambda(const db_lr_schedule *s, int64_t step)
{
    int64_t W = s->warmup_steps, T = s->training_steps;
    if (s->kind == DB_LR_CONSTANT)
        return 1.0;
    if (step < W)
        return (double)step / (double)max64(1, W);
    double progress = (double)(step - W) / (double)max64(1, T - W);
    switch (s->kind) {
    case DB_LR_CONSTANT_WITH_WARMUP:
        return 1.0;
    case DB_LR_LINEAR:
        return fmax(0.0, (double)(T - step) / (double)max64(1, T - W));
    case DB_LR_COSINE:
        return fmax(0.0, 0.5 * (1.0 + cos(M_PI * s->num_cycles * 2.0 * progress)));
    case DB_LR_COSINE_WITH_RESTARTS: {
        if (progress >= 1.0)
            return 0.0;
        /* Python's % on non-negative floats equals fmod */
        return fmax(0.0, 0.5 * (1.0 + cos(M_PI * fmod(s->num_cycles * progress, 1.0))));
    }
    case DB_LR_POLYNOMIAL: {
        double lr_init = s->base_lr;
        if (!(lr_init > s->lr_end))
            return NAN; /* diffusers raises ValueError */
        if (step > T)
            return s->lr_end / lr_init; /* LambdaLR multiplies by lr_init again */
        double lr_range = lr_init - s->lr_end;
        double decay_steps = (double)(T - W);
        double pct_remaining = 1.0 - (double)(step - W) / decay_steps;
        double decay = lr_range * pow(pct_remaining, s->power) + s->lr_end;
        return decay / lr_init;
    }
    case DB_LR_CONSTANT:
        break;
    }
    return 1.0;
}

double db_lr_at(const db_lr_schedule *s, int64_t step)
{
    return s->base_lr * lr_lambda(s, step);
}
