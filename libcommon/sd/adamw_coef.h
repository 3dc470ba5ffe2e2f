/* The float32 scalars of one AdamW step (optim.h's formulas), derived on
 * the host in double from the Python-double hyper-parameters and rounded to
 * float where torch applies them to a float32 tensor (Scalar.to<float>()
 * rounds to nearest).
 *
 * A header of its own, in C that also compiles as C++, because two
 * libraries need the very same code: optim.c (the CPU step, in libdb.a) and
 * kernels/cuda/optim.cu (the CUDA step, in libdb_cuda.so, which does not
 * link libdb.a).  One definition keeps the two steps bit-identical; both
 * call the same libm pow/sqrt on the host. */
#ifndef DB_ADAMW_COEF_H
#define DB_ADAMW_COEF_H

#include <math.h>
#include <stdint.h>

#include "libcommon/sd/optim.h"

typedef struct db_adamw_coef {
    float decay, b1, one_minus_b1, b2, one_minus_b2, bc2_sqrt, eps, neg_step_size;
    float grad_coef; /* 0: g as it is; else g * grad_coef first (optim.h) */
} db_adamw_coef;

static inline db_adamw_coef db_adamw_coefs(const db_adamw *hp, int64_t t)
{
    /* torch 1.13 keeps `step` in a float32 tensor and reads it back with
     * .item(): exact for any realistic step count. */
    double step = (double)(float)t;
    double bc1 = 1.0 - pow(hp->beta1, step);
    double bc2 = 1.0 - pow(hp->beta2, step);
    double step_size = hp->lr / bc1;
    db_adamw_coef c;
    c.decay = (float)(1.0 - hp->lr * hp->weight_decay);
    c.b1 = (float)hp->beta1;
    c.one_minus_b1 = (float)(1.0 - hp->beta1);
    c.b2 = (float)hp->beta2;
    c.one_minus_b2 = (float)(1.0 - hp->beta2);
    c.bc2_sqrt = (float)sqrt(bc2);
    c.eps = (float)hp->eps;
    c.neg_step_size = (float)-step_size;
    c.grad_coef = (float)hp->grad_coef;
    return c;
}

/* The scalars a step on HOST memory uses: *hp->coefs when set (optim.h),
 * else db_adamw_coefs(hp, t).  (The CUDA step reads hp->coefs on the
 * device.) */
static inline db_adamw_coef db_adamw_coefs_host(const db_adamw *hp, int64_t t)
{
    return hp->coefs ? *hp->coefs : db_adamw_coefs(hp, t);
}

#endif
