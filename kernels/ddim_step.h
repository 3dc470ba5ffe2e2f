/* One element of a DDIM step (kernels/ops.h db_ddim_step_forward): the
 * float operations of diffusers' DDIMScheduler.step on 0-dim tensors, in
 * its order, each rounded once.  One source for the scheduler's host loop
 * (libcommon/sd/sched.c), the CPU op (kernels/cpu/eltwise.c) and the CUDA
 * kernel (kernels/cuda/eltwise.cu), so that all three give the same bits:
 * the C files are built without contraction (-std=c11), and on the device
 * each operation is an explicit round-to-nearest intrinsic, which nvcc never
 * fuses into an FMA. */
#ifndef DB_DDIM_STEP_H
#define DB_DDIM_STEP_H

#include "kernels/ops.h"

#if defined(__clang__) && !defined(__CUDACC__)
#pragma STDC FP_CONTRACT OFF
#endif

#if defined(__CUDA_ARCH__)
#define DB_DD_MUL(a, b) __fmul_rn(a, b)
#define DB_DD_ADD(a, b) __fadd_rn(a, b)
#define DB_DD_SUB(a, b) __fsub_rn(a, b)
#define DB_DD_DIV(a, b) __fdiv_rn(a, b)
#else
#define DB_DD_MUL(a, b) ((a) * (b))
#define DB_DD_ADD(a, b) ((a) + (b))
#define DB_DD_SUB(a, b) ((a) - (b))
#define DB_DD_DIV(a, b) ((a) / (b))
#endif
#if defined(__CUDACC__)
#define DB_DD_FN static __host__ __device__ __forceinline__
#else
#define DB_DD_FN static inline
#endif

/* The sample after the step for one element: x the sample, mo the model's
 * output, nz the noise (read when k->noise_on); *x0 the predicted clean
 * sample. */
DB_DD_FN float db_ddim_elem(const db_ddim_coef *k, float x, float mo, float nz, float *x0)
{
    float p0, pe;
    if (k->pred == 0) { /* epsilon: x0 = (x - sqrt(1 - a) eps) / sqrt(a) */
        const float t = DB_DD_MUL(k->sb, mo);
        p0 = DB_DD_DIV(DB_DD_SUB(x, t), k->sa);
        pe = mo;
    } else if (k->pred == 2) { /* sample: eps = (x - sqrt(a) x0) / sqrt(1 - a) */
        p0 = mo;
        const float t = DB_DD_MUL(k->sa, p0);
        pe = DB_DD_DIV(DB_DD_SUB(x, t), k->sb);
    } else { /* v: x0 = sqrt(a) x - sqrt(1 - a) v, eps = sqrt(a) v + sqrt(1 - a) x */
        p0 = DB_DD_SUB(DB_DD_MUL(k->sa, x), DB_DD_MUL(k->sb, mo));
        pe = DB_DD_ADD(DB_DD_MUL(k->sa, mo), DB_DD_MUL(k->sb, x));
    }
    if (k->clip_on) /* torch.clamp, which keeps NaN */
        p0 = p0 < -k->cr ? -k->cr : p0 > k->cr ? k->cr : p0;
    float y = DB_DD_ADD(DB_DD_MUL(k->sap, p0), DB_DD_MUL(k->dirc, pe));
    if (k->noise_on)
        y = DB_DD_ADD(y, DB_DD_MUL(k->std, nz));
    *x0 = p0;
    return y;
}

#endif
