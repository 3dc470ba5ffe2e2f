/* Backward of the activations, arithmetic, layout ops and embeddings.
 * Portable loops (memory-bound; the compiler vectorises the simple ones).
 * Every output element is written by one task and every sum has a fixed
 * order, so results are bit-identical at any thread count.  dinp may equal
 * dout (each element is read before it is written). */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

enum {
    CHUNK = 16384, /* elements per task, as in eltwise.c */
    COLS = 64      /* embedding columns per task */
};

typedef enum { ACT_SILU, ACT_GELU_ERF, ACT_GELU_TANH, ACT_QUICK_GELU } act_kind;

static float sigmoid1(float x) { return 1.0f / (1.0f + expf(-x)); }

static float gelu_erf_grad1(float x)
{
    /* 0.5 (1 + erf(x / sqrt 2)) + x phi(x) */
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

/* d act(x) / dx */
static float act_grad1(act_kind kind, float x)
{
    switch (kind) {
    case ACT_SILU: {
        const float s = sigmoid1(x);
        return s * (1.0f + x * (1.0f - s));
    }
    case ACT_GELU_ERF:
        return gelu_erf_grad1(x);
    case ACT_GELU_TANH: {
        const float k = 0.7978845608028654f, x2 = x * x;
        const float t = tanhf(k * (x + 0.044715f * x2 * x));
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * k * (1.0f + 3.0f * 0.044715f * x2);
    }
    case ACT_QUICK_GELU: {
        const float s = sigmoid1(1.702f * x);
        return s + 1.702f * x * s * (1.0f - s);
    }
    }
    return 1.0f;
}

static int activation_backward(db_ctx *c, act_kind kind, float *dinp, const float *dout, const float *inp, size_t N)
{
    const size_t nchunks = (N + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (size_t ch = 0; ch < nchunks; ch++) {
        const size_t i0 = ch * CHUNK, i1 = N - i0 < CHUNK ? N : i0 + CHUNK;
        for (size_t i = i0; i < i1; i++)
            dinp[i] = dout[i] * act_grad1(kind, inp[i]);
    }
    return 0;
}

int db_cpu_silu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)
{
    return activation_backward(c, ACT_SILU, dinp, dout, inp, N);
}

int db_cpu_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N, db_gelu_kind kind)
{
    return activation_backward(c, kind == DB_GELU_TANH ? ACT_GELU_TANH : ACT_GELU_ERF, dinp, dout, inp, N);
}

int db_cpu_quick_gelu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, size_t N)
{
    return activation_backward(c, ACT_QUICK_GELU, dinp, dout, inp, N);
}

int db_cpu_geglu_backward(db_ctx *c, float *dinp, const float *dout, const float *inp, int N, int C)
{
    /* out = hidden * gelu(gate): dhidden = dout gelu(gate), dgate = dout hidden gelu'(gate) */
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < N; r++) {
        const float *hidden = inp + (size_t)r * 2 * C, *gate = hidden + C, *dy = dout + (size_t)r * C;
        float *dh = dinp + (size_t)r * 2 * C, *dg = dh + C;
        for (int i = 0; i < C; i++) {
            const float g = gate[i], h = hidden[i], d = dy[i];
            dh[i] = d * 0.5f * g * (1.0f + erff(g * 0.70710678118654752f));
            dg[i] = d * h * gelu_erf_grad1(g);
        }
    }
    return 0;
}

int db_cpu_mul_backward(db_ctx *c, float *da, float *db, const float *dout, const float *a, const float *b, size_t N)
{
    const size_t nchunks = (N + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (size_t ch = 0; ch < nchunks; ch++) {
        const size_t i0 = ch * CHUNK, i1 = N - i0 < CHUNK ? N : i0 + CHUNK;
        for (size_t i = i0; i < i1; i++) {
            const float d = dout[i], ai = a[i], bi = b[i]; /* read all first: outputs may alias */
            if (da)
                da[i] = d * bi;
            if (db)
                db[i] = d * ai;
        }
    }
    return 0;
}

int db_cpu_add_channel_backward(db_ctx *c, float *dvec, const float *dout, int B, int C, int HW)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int bc = 0; bc < B * C; bc++) {
        const float *d = dout + (size_t)bc * HW;
        double s = 0;
        for (int i = 0; i < HW; i++)
            s += d[i];
        dvec[bc] = (float)s;
    }
    return 0;
}

int db_cpu_concat_channels_backward(db_ctx *c, float *da, float *db, const float *dout, int B, int C1, int C2, int HW)
{
    const size_t na = (size_t)C1 * HW, nb = (size_t)C2 * HW;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int i = 0; i < B; i++) {
        if (da)
            memcpy(da + (size_t)i * na, dout + (size_t)i * (na + nb), na * sizeof *da);
        if (db)
            memcpy(db + (size_t)i * nb, dout + (size_t)i * (na + nb) + na, nb * sizeof *db);
    }
    return 0;
}

int db_cpu_upsample_nearest2x_backward(db_ctx *c, float *dinp, const float *dout, int B, int C, int H, int W)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (long r = 0; r < (long)B * C * H; r++) { /* two output rows -> one input row */
        const float *y0 = dout + (size_t)r * 4 * W, *y1 = y0 + 2 * W;
        float *x = dinp + (size_t)r * W;
        for (int j = 0; j < W; j++)
            x[j] = (y0[2 * j] + y0[2 * j + 1]) + (y1[2 * j] + y1[2 * j + 1]);
    }
    return 0;
}

int db_cpu_embedding_backward(db_ctx *c, float *dwte, float *dwpe, const float *dout, const int32_t *tokens, int B,
                              int T, int C, int V)
{
    for (long i = 0; i < (long)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return db_err_set(&c->err, DB_EFORMAT,
                              "embedding backward: token id %d at position %ld is outside [0, %d)", (int)tokens[i], i,
                              V);
    /* Repeated tokens add into one row: tasks own column blocks and walk the
     * tokens in order, so there is no race and the order is fixed. */
    const int nblk = (C + COLS - 1) / COLS;
    if (dwte) {
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int blk = 0; blk < nblk; blk++) {
            const int j0 = blk * COLS, nj = C - j0 < COLS ? C - j0 : COLS;
            for (long i = 0; i < (long)B * T; i++) {
                const float *d = dout + (size_t)i * C + j0;
                float *w = dwte + (size_t)tokens[i] * C + j0;
                for (int j = 0; j < nj; j++)
                    w[j] += d[j];
            }
        }
    }
    if (dwpe) {
        /* dwpe[t] += sum over b of dout[b, t] (rows T.. of the table untouched) */
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int t = 0; t < T; t++) {
            float *w = dwpe + (size_t)t * C;
            for (int b = 0; b < B; b++) {
                const float *d = dout + ((size_t)b * T + t) * C;
                for (int j = 0; j < C; j++)
                    w[j] += d[j];
            }
        }
    }
    return 0;
}
