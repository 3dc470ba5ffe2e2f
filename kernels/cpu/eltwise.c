/* Elementwise activations and arithmetic, layout ops and embeddings.
 * Memory-bound: split into chunks of CHUNK elements over the threads; the
 * transcendental activations use the AVX-512 vector math when ctx->simd. */
#include <math.h>
#include <omp.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#include "kernels/ddim_step.h"

enum { CHUNK = 16384 }; /* elements per task: 64 KiB, a few tasks per thread at small N */

typedef enum { ACT_SILU, ACT_GELU_ERF, ACT_GELU_TANH, ACT_QUICK_GELU } act_kind;

static float gelu_erf1(float x) { return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f)); }

static float act1(act_kind kind, float x)
{
    switch (kind) {
    case ACT_SILU:
        return x / (1.0f + expf(-x));
    case ACT_GELU_ERF:
        return gelu_erf1(x);
    case ACT_GELU_TANH:
        return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
    case ACT_QUICK_GELU:
        return x / (1.0f + expf(-1.702f * x));
    }
    return x;
}

static void act_chunk(int simd, act_kind kind, float *out, const float *inp, size_t n)
{
    if (!simd) {
        for (size_t i = 0; i < n; i++)
            out[i] = act1(kind, inp[i]);
        return;
    }
    switch (kind) {
    case ACT_SILU:
        db_avx512_silu(out, inp, n);
        break;
    case ACT_GELU_ERF:
        db_avx512_gelu_erf(out, inp, n);
        break;
    case ACT_GELU_TANH:
        db_avx512_gelu_tanh(out, inp, n);
        break;
    case ACT_QUICK_GELU:
        db_avx512_quick_gelu(out, inp, n);
        break;
    }
}

static int activation(db_ctx *c, act_kind kind, float *out, const float *inp, size_t N)
{
    const size_t nchunks = (N + CHUNK - 1) / CHUNK;
    const int simd = c->simd;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (size_t ch = 0; ch < nchunks; ch++) {
        const size_t i0 = ch * CHUNK, n = N - i0 < CHUNK ? N - i0 : CHUNK;
        act_chunk(simd, kind, out + i0, inp + i0, n);
    }
    return 0;
}

int db_cpu_silu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    return activation(c, ACT_SILU, out, inp, N);
}

int db_cpu_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind)
{
    return activation(c, kind == DB_GELU_TANH ? ACT_GELU_TANH : ACT_GELU_ERF, out, inp, N);
}

int db_cpu_quick_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    return activation(c, ACT_QUICK_GELU, out, inp, N);
}

void db_cpu_geglu_row(const db_ctx *c, float *out, const float *inp, int C)
{
    const float *hidden = inp, *gate = inp + C;
    if (c->simd) {
        db_avx512_geglu(out, hidden, gate, (size_t)C);
    } else {
        for (int i = 0; i < C; i++)
            out[i] = hidden[i] * gelu_erf1(gate[i]);
    }
}

int db_cpu_geglu_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < N; r++)
        db_cpu_geglu_row(c, out + (size_t)r * C, inp + (size_t)r * 2 * C, C);
    return 0;
}

/* out = alpha a + beta b (beta == 0: b unused, may be NULL), or a * b. */
static int binary(db_ctx *c, int mul, float *out, const float *a, const float *b, float alpha, float beta, size_t N)
{
    const size_t nchunks = (N + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (size_t ch = 0; ch < nchunks; ch++) {
        const size_t i0 = ch * CHUNK, i1 = N - i0 < CHUNK ? N : i0 + CHUNK;
        if (mul) {
            for (size_t i = i0; i < i1; i++)
                out[i] = a[i] * b[i];
        } else if (beta == 0.0f) {
            for (size_t i = i0; i < i1; i++)
                out[i] = alpha * a[i];
        } else {
            for (size_t i = i0; i < i1; i++)
                out[i] = alpha * a[i] + beta * b[i];
        }
    }
    return 0;
}

int db_cpu_add_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    return binary(c, 0, out, a, b, 1.0f, 1.0f, N);
}

int db_cpu_mul_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    return binary(c, 1, out, a, b, 1.0f, 1.0f, N);
}

int db_cpu_axpby_forward(db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta, size_t N)
{
    return binary(c, 0, out, x, y, alpha, beta, N);
}

int db_cpu_ddim_step_forward(db_ctx *c, float *x, float *pred_x0, const float *mo, const float *noise, size_t N,
                             const db_ddim_coef *k)
{
    const db_ddim_coef kk = *k;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (size_t e = 0; e < N; e++) {
        float x0;
        x[e] = db_ddim_elem(&kk, x[e], mo[e], kk.noise_on ? noise[e] : 0.0f, &x0);
        if (pred_x0)
            pred_x0[e] = x0;
    }
    return 0;
}

int db_cpu_add_channel_forward(db_ctx *c, float *out, const float *inp, const float *vec, int B, int C, int HW)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int bc = 0; bc < B * C; bc++) {
        const float a = vec[bc];
        const float *x = inp + (size_t)bc * HW;
        float *y = out + (size_t)bc * HW;
        for (int i = 0; i < HW; i++)
            y[i] = x[i] + a;
    }
    return 0;
}

int db_cpu_concat_channels_forward(db_ctx *c, float *out, const float *a, const float *b, int B, int C1, int C2,
                                   int HW)
{
    const size_t na = (size_t)C1 * HW, nb = (size_t)C2 * HW;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int i = 0; i < B; i++) {
        memcpy(out + (size_t)i * (na + nb), a + (size_t)i * na, na * sizeof *a);
        memcpy(out + (size_t)i * (na + nb) + na, b + (size_t)i * nb, nb * sizeof *b);
    }
    return 0;
}

int db_cpu_transpose_forward(db_ctx *c, float *out, const float *inp, int B, int M, int N)
{
    return db_cpu_transpose_add_forward(c, out, inp, NULL, B, M, N);
}

int db_cpu_transpose_add_forward(db_ctx *c, float *out, const float *inp, const float *res, int B, int M, int N)
{
    enum { TB = 32 }; /* 32x32 tiles: both sides touch whole cache lines */
    const int tm = (M + TB - 1) / TB, tn = (N + TB - 1) / TB;
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (long t = 0; t < (long)B * tm * tn; t++) {
        const int b = (int)(t / ((long)tm * tn)), i0 = (int)(t / tn % tm) * TB, j0 = (int)(t % tn) * TB;
        const float *x = inp + (size_t)b * M * N, *r = res ? res + (size_t)b * M * N : NULL;
        float *y = out + (size_t)b * M * N;
        const int ie = i0 + TB < M ? i0 + TB : M, je = j0 + TB < N ? j0 + TB : N;
        if (r)
            for (int j = j0; j < je; j++)
                for (int i = i0; i < ie; i++)
                    y[(size_t)j * M + i] = x[(size_t)i * N + j] + r[(size_t)j * M + i];
        else
            for (int j = j0; j < je; j++)
                for (int i = i0; i < ie; i++)
                    y[(size_t)j * M + i] = x[(size_t)i * N + j];
    }
    return 0;
}

int db_cpu_upsample_nearest2x_forward(db_ctx *c, float *out, const float *inp, int B, int C, int H, int W)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (long r = 0; r < (long)B * C * H; r++) { /* one input row -> two output rows */
        const float *x = inp + (size_t)r * W;
        float *y = out + (size_t)r * 4 * W;
        for (int j = 0; j < W; j++)
            y[2 * j] = y[2 * j + 1] = x[j];
        memcpy(y + 2 * W, y, (size_t)2 * W * sizeof *y);
    }
    return 0;
}

int db_cpu_timestep_embedding_forward(db_ctx *c, float *out, const float *timesteps, int B, int D,
                                      int flip_sin_to_cos, float shift, float max_period)
{
    /* Each step rounds to float32 where diffusers' float32 tensors do:
     *   exponent = -math.log(max_period) * arange(half, float32)  (a float32 product)
     *   exponent = exponent / (half - shift)                       (a float32 quotient)
     *   emb = t[:, None].float() * exp(exponent)[None, :]          */
    const int half = D / 2;
    const float neg_log = (float)-log((double)max_period);
    const float denom = (float)((double)half - (double)shift);
    for (int b = 0; b < B; b++) {
        float *o = out + (size_t)b * D;
        for (int i = 0; i < half; i++) {
            const float exponent = (neg_log * (float)i) / denom;
            const float arg = timesteps[b] * expf(exponent);
            const float s = sinf(arg), co = cosf(arg);
            o[i] = flip_sin_to_cos ? co : s;
            o[half + i] = flip_sin_to_cos ? s : co;
        }
        if (D % 2)
            o[D - 1] = 0.0f;
    }
    return 0;
}

int db_cpu_embedding_forward(db_ctx *c, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B,
                             int T, int C, int V)
{
    for (long i = 0; i < (long)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= V)
            return db_err_set(&c->err, DB_EFORMAT, "embedding: token id %d at position %ld is outside [0, %d)",
                              (int)tokens[i], i, V);
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (long i = 0; i < (long)B * T; i++) {
        const float *e = wte + (size_t)tokens[i] * C, *p = wpe ? wpe + (size_t)(i % T) * C : NULL;
        float *o = out + (size_t)i * C;
        if (p) {
            for (int j = 0; j < C; j++)
                o[j] = e[j] + p[j];
        } else {
            memcpy(o, e, (size_t)C * sizeof *o);
        }
    }
    return 0;
}
