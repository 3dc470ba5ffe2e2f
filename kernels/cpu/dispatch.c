/* The device-generic face of kernels/ops.h: context lifetime, argument checks,
 * the sticky error, and THE dispatch point: each op is one switch on
 * ctx->device into a backend function of identical signature (db_cpu_* here;
 * the CUDA issue adds `case DB_CUDA: return db_cuda_xxx(...)` to each switch,
 * reaching libdb_cuda.so through the handle it keeps in the ctx).
 *
 * It lives in kernels/cpu/ only because libdb.a is built from the C files there;
 * nothing in it is CPU specific. */
#include <omp.h>
#include <stdlib.h>

#include "kernels/cpu/cpu.h"

int db_ctx_create(db_ctx **out, db_device device, int threads, db_err *err)
{
    *out = NULL;
    if (threads < 0)
        return db_err_set(err, DB_EUSAGE, "context: thread count %d is negative", threads);
    db_ctx *c = calloc(1, sizeof *c);
    if (!c)
        return db_err_set(err, DB_ENOMEM, "context: out of memory");
    c->device = device;
    c->threads = threads ? threads : omp_get_num_procs();
    switch (device) {
    case DB_CPU:
        __builtin_cpu_init();
        c->simd = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                  __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
        if (db_cpu_init(c) != 0) {
            db_err_set(err, c->err.code, "%s", c->err.msg);
            db_ctx_destroy(c);
            return -1;
        }
        break;
    default:
        free(c);
        return db_err_set(err, DB_EUNSUPP, "context: device %d has no backend in this build", (int)device);
    }
    *out = c;
    return 0;
}

void db_ctx_destroy(db_ctx *c)
{
    if (!c)
        return;
    db_cpu_free(c);
    free(c);
}

void db_ctx_clear_error(db_ctx *c) { db_err_clear(&c->err); }

void db_ctx_trim(db_ctx *c)
{
    if (c->device == DB_CPU)
        db_cpu_trim(c);
}

/* Every op starts with ENTER: a failed ctx stays failed (sticky error). */
#define ENTER(c)                 \
    do {                         \
        if ((c)->err.code != 0)  \
            return -1;           \
    } while (0)

/* Argument checks shared by all backends; the message names the op and the
 * condition that failed. */
#define REQUIRE(c, op, cond)                                                                   \
    do {                                                                                       \
        if (!(cond))                                                                           \
            return db_err_set(&(c)->err, DB_EUSAGE, "%s: invalid arguments: need %s", op, #cond); \
    } while (0)

static int no_backend(db_ctx *c, const char *op)
{
    return db_err_set(&c->err, DB_EUNSUPP, "%s: device %d has no implementation", op, (int)c->device);
}

int db_gemm_forward(db_ctx *c, float *Cm, const float *A, const float *B, int batch, int M, int N, int K,
                    int transa, int transb, float alpha, float beta)
{
    ENTER(c);
    REQUIRE(c, "gemm", Cm && A && B && batch > 0 && M > 0 && N > 0 && K > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_gemm_forward(c, Cm, A, B, batch, M, N, K, transa, transb, alpha, beta);
    default:
        return no_backend(c, "gemm");
    }
}

int db_linear_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int N, int C,
                      int OC)
{
    ENTER(c);
    REQUIRE(c, "linear", out && inp && weight && N > 0 && C > 0 && OC > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_linear_forward(c, out, inp, weight, bias, N, C, OC);
    default:
        return no_backend(c, "linear");
    }
}

int db_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B, int C,
                      int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1)
{
    ENTER(c);
    REQUIRE(c, "conv2d", out && inp && weight && B > 0 && C > 0 && H > 0 && W > 0 && OC > 0 && KH > 0 && KW > 0);
    REQUIRE(c, "conv2d", stride > 0 && pad0 >= 0 && pad1 >= 0 && H + pad0 + pad1 >= KH && W + pad0 + pad1 >= KW);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_conv2d_forward(c, out, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
    default:
        return no_backend(c, "conv2d");
    }
}

int db_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                         const float *bias, int B, int C, int HW, int G, float eps, int silu)
{
    ENTER(c);
    REQUIRE(c, "groupnorm", out && inp && weight && bias && B > 0 && C > 0 && HW > 0 && G > 0 && C % G == 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_groupnorm_forward(c, out, mean, rstd, inp, weight, bias, B, C, HW, G, eps, silu);
    default:
        return no_backend(c, "groupnorm");
    }
}

int db_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp, const float *weight,
                         const float *bias, int N, int C, float eps)
{
    ENTER(c);
    REQUIRE(c, "layernorm", out && inp && weight && bias && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_layernorm_forward(c, out, mean, rstd, inp, weight, bias, N, C, eps);
    default:
        return no_backend(c, "layernorm");
    }
}

int db_attention_forward(db_ctx *c, float *out, float *lse, const float *q, const float *k, const float *v, int B,
                         int Tq, int Tk, int NH, int HS, int causal)
{
    ENTER(c);
    REQUIRE(c, "attention", out && q && k && v && B > 0 && Tq > 0 && Tk > 0 && NH > 0 && HS > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_attention_forward(c, out, lse, q, k, v, B, Tq, Tk, NH, HS, causal);
    default:
        return no_backend(c, "attention");
    }
}

int db_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "softmax", out && inp && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_softmax_forward(c, out, inp, N, C);
    default:
        return no_backend(c, "softmax");
    }
}

int db_silu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    ENTER(c);
    REQUIRE(c, "silu", out && inp);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_silu_forward(c, out, inp, N);
    default:
        return no_backend(c, "silu");
    }
}

int db_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N, db_gelu_kind kind)
{
    ENTER(c);
    REQUIRE(c, "gelu", out && inp && (kind == DB_GELU_ERF || kind == DB_GELU_TANH));
    switch (c->device) {
    case DB_CPU:
        return db_cpu_gelu_forward(c, out, inp, N, kind);
    default:
        return no_backend(c, "gelu");
    }
}

int db_quick_gelu_forward(db_ctx *c, float *out, const float *inp, size_t N)
{
    ENTER(c);
    REQUIRE(c, "quick_gelu", out && inp);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_quick_gelu_forward(c, out, inp, N);
    default:
        return no_backend(c, "quick_gelu");
    }
}

int db_geglu_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    ENTER(c);
    REQUIRE(c, "geglu", out && inp && N > 0 && C > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_geglu_forward(c, out, inp, N, C);
    default:
        return no_backend(c, "geglu");
    }
}

int db_add_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    ENTER(c);
    REQUIRE(c, "add", out && a && b);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_add_forward(c, out, a, b, N);
    default:
        return no_backend(c, "add");
    }
}

int db_mul_forward(db_ctx *c, float *out, const float *a, const float *b, size_t N)
{
    ENTER(c);
    REQUIRE(c, "mul", out && a && b);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_mul_forward(c, out, a, b, N);
    default:
        return no_backend(c, "mul");
    }
}

int db_axpby_forward(db_ctx *c, float *out, const float *x, const float *y, float alpha, float beta, size_t N)
{
    ENTER(c);
    REQUIRE(c, "axpby", out && x && (y || beta == 0.0f));
    switch (c->device) {
    case DB_CPU:
        return db_cpu_axpby_forward(c, out, x, y, alpha, beta, N);
    default:
        return no_backend(c, "axpby");
    }
}

int db_add_channel_forward(db_ctx *c, float *out, const float *inp, const float *vec, int B, int C, int HW)
{
    ENTER(c);
    REQUIRE(c, "add_channel", out && inp && vec && B > 0 && C > 0 && HW > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_add_channel_forward(c, out, inp, vec, B, C, HW);
    default:
        return no_backend(c, "add_channel");
    }
}

int db_concat_channels_forward(db_ctx *c, float *out, const float *a, const float *b, int B, int C1, int C2, int HW)
{
    ENTER(c);
    REQUIRE(c, "concat_channels", out && a && b && B > 0 && C1 > 0 && C2 > 0 && HW > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_concat_channels_forward(c, out, a, b, B, C1, C2, HW);
    default:
        return no_backend(c, "concat_channels");
    }
}

int db_transpose_forward(db_ctx *c, float *out, const float *inp, int B, int M, int N)
{
    ENTER(c);
    REQUIRE(c, "transpose", out && inp && out != inp && B > 0 && M > 0 && N > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_transpose_forward(c, out, inp, B, M, N);
    default:
        return no_backend(c, "transpose");
    }
}

int db_upsample_nearest2x_forward(db_ctx *c, float *out, const float *inp, int B, int C, int H, int W)
{
    ENTER(c);
    REQUIRE(c, "upsample_nearest2x", out && inp && out != inp && B > 0 && C > 0 && H > 0 && W > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_upsample_nearest2x_forward(c, out, inp, B, C, H, W);
    default:
        return no_backend(c, "upsample_nearest2x");
    }
}

int db_timestep_embedding_forward(db_ctx *c, float *out, const float *timesteps, int B, int D, int flip_sin_to_cos,
                                  float shift, float max_period)
{
    ENTER(c);
    REQUIRE(c, "timestep_embedding", out && timesteps && B > 0 && D >= 2 && max_period > 0 && D / 2 - shift != 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_timestep_embedding_forward(c, out, timesteps, B, D, flip_sin_to_cos, shift, max_period);
    default:
        return no_backend(c, "timestep_embedding");
    }
}

int db_embedding_forward(db_ctx *c, float *out, const int32_t *tokens, const float *wte, const float *wpe, int B,
                         int T, int C, int V)
{
    ENTER(c);
    REQUIRE(c, "embedding", out && tokens && wte && B > 0 && T > 0 && C > 0 && V > 0);
    switch (c->device) {
    case DB_CPU:
        return db_cpu_embedding_forward(c, out, tokens, wte, wpe, B, T, C, V);
    default:
        return no_backend(c, "embedding");
    }
}
