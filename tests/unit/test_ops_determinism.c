/* Forward ops give the same bits at any thread count (what training's "same
 * inputs, same gradients" rests on), at shapes where a threaded library GEMM
 * would split the reduction: SD1.5's 1280- and 2560-channel convolutions at
 * 8x8 and 16x16 (the im2col path), a 320-channel 32x32 one (oneDNN's blocked
 * path), 1x1 convolutions, CLIP- and UNet-sized linears, a large GEMM,
 * attention, group and layer norm.  1 thread against 3 (more threads than
 * this machine's cores is fine for a bit comparison). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/sd/noise.h"
#include "tap.h"

static float *rnd(size_t n, uint64_t seed)
{
    float *p = malloc(n * sizeof *p);
    db_noise_fill(p, n, seed, 0, 0);
    return p;
}

/* run `op` on c1 and c3 into o1, o3 (n floats) and compare */
#define SAME(what, n, call1, call3)                                                                  \
    do {                                                                                             \
        int r1 = (call1), r3 = (call3);                                                              \
        tap_ok(r1 == 0 && r3 == 0 && memcmp(o1, o3, (n) * sizeof(float)) == 0, "%s: 1 and 3 threads bit-identical", \
               what);                                                                                \
    } while (0)

int main(void)
{
    db_err err = {0};
    db_ctx *c1 = NULL, *c3 = NULL;
    if (!tap_ok(db_ctx_create(&c1, DB_CPU, 1, &err) == 0 && db_ctx_create(&c3, DB_CPU, 3, &err) == 0, "contexts%s%s",
                err.code ? ": " : "", err.msg))
        return tap_done();
    const size_t MAXN = (size_t)4096 * 1280 * 2; /* the largest operand below, with room */
    float *o1 = malloc(MAXN * 4), *o3 = malloc(MAXN * 4), *x = rnd(MAXN, 1), *w = rnd((size_t)2560 * 1280 * 9, 2);
    float *b = rnd(4096, 3), *y = rnd(MAXN, 4), *z = rnd(MAXN, 5);
    static const struct {
        int B, C, H, OC, K;
    } conv[] = {{1, 2560, 8, 1280, 3}, {2, 1280, 16, 1280, 3}, {1, 320, 32, 320, 3}, {2, 1280, 16, 640, 1}};
    for (size_t i = 0; i < sizeof conv / sizeof *conv; i++) {
        char what[96];
        const int B = conv[i].B, C = conv[i].C, H = conv[i].H, OC = conv[i].OC, K = conv[i].K, p = K / 2;
        snprintf(what, sizeof what, "conv2d %dx%d %d -> %d, %dx%d kernel", H, H, C, OC, K, K);
        SAME(what, (size_t)B * OC * H * H, db_conv2d_forward(c1, o1, x, w, b, B, C, H, H, OC, K, K, 1, p, p),
             db_conv2d_forward(c3, o3, x, w, b, B, C, H, H, OC, K, K, 1, p, p));
    }
    SAME("linear 154 x 3072 -> 768 (CLIP fc2)", (size_t)154 * 768, db_linear_forward(c1, o1, x, w, b, 154, 3072, 768),
         db_linear_forward(c3, o3, x, w, b, 154, 3072, 768));
    SAME("linear 1024 x 5120 -> 1280 (UNet ff)", (size_t)1024 * 1280,
         db_linear_forward(c1, o1, x, w, b, 1024, 5120, 1280), db_linear_forward(c3, o3, x, w, b, 1024, 5120, 1280));
    SAME("gemm 512 x 2048 x 2048", (size_t)512 * 2048, db_gemm_forward(c1, o1, x, w, 1, 512, 2048, 2048, 0, 0, 1, 0),
         db_gemm_forward(c3, o3, x, w, 1, 512, 2048, 2048, 0, 0, 1, 0));
    {
        float *l1 = malloc(2 * 8 * 1024 * 4), *l3 = malloc(2 * 8 * 1024 * 4);
        SAME("attention 1024 tokens, 8 heads of 40", (size_t)2 * 1024 * 320,
             db_attention_forward(c1, o1, l1, x, y, z, 2, 1024, 1024, 8, 40, 0),
             db_attention_forward(c3, o3, l3, x, y, z, 2, 1024, 1024, 8, 40, 0));
        free(l1), free(l3);
    }
    SAME("groupnorm+silu 32 groups of 640 at 32x32", (size_t)2 * 640 * 1024,
         db_groupnorm_forward(c1, o1, NULL, NULL, x, b, y, 2, 640, 1024, 32, 1e-5f, 1),
         db_groupnorm_forward(c3, o3, NULL, NULL, x, b, y, 2, 640, 1024, 32, 1e-5f, 1));
    SAME("layernorm 4096 x 1280", (size_t)4096 * 1280,
         db_layernorm_forward(c1, o1, NULL, NULL, x, b, y, 4096, 1280, 1e-5f),
         db_layernorm_forward(c3, o3, NULL, NULL, x, b, y, 4096, 1280, 1e-5f));
    free(o1), free(o3), free(x), free(w), free(b), free(y), free(z);
    db_ctx_destroy(c1);
    db_ctx_destroy(c3);
    return tap_done();
}
