/* Backward of conv2d as GEMMs over an im2col buffer, per image b:
 *   col    (C*KH*KW, OH*OW)  the input patches (im2col of inp[b], zero padding)
 *   dweight (OC, C*KH*KW)   += dout[b] (OC, OH*OW) @ col^T
 *   dcol   (C*KH*KW, OH*OW)  = weight^T (C*KH*KW, OC) @ dout[b]
 *   dinp[b]                  = col2im(dcol): each patch entry added back to
 *                              the pixel it came from (padding dropped)
 *   dbias  (OC)             += sum over B, OH, OW of dout
 * col and dcol share one scratch buffer (col is dead once dweight has it).
 * A 1x1, stride-1, unpadded convolution needs no im2col: col is inp[b] and
 * dcol is dinp[b] itself.
 *
 * Chosen over oneDNN's backward-data / backward-weights primitives for
 * simplicity (correctness first); the sgemm calls carry the flops.  Memory:
 * C*KH*KW*OH*OW floats of scratch (47 MB at SD1.5's 320-channel 64x64
 * level).
 *
 * Determinism: im2col/col2im and the bias sums are ours, with each output
 * written by one task in a fixed order, and the products go through
 * db_cpu_sgemm_fixed (gemm_backward.c): thread-count independent. */
#include <omp.h>
#include <string.h>

#include "kernels/cpu/cpu.h"

void db_cpu_im2col(db_ctx *c, float *col, const float *x, int C, int H, int W, int KH, int KW, int stride, int pad0,
                   int OH, int OW)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int r = 0; r < C * KH * KW; r++) {
        const int ci = r / (KH * KW), ky = r / KW % KH, kx = r % KW;
        const float *xc = x + (size_t)ci * H * W;
        float *dst = col + (size_t)r * OH * OW;
        for (int oy = 0; oy < OH; oy++) {
            const int iy = oy * stride + ky - pad0;
            for (int ox = 0; ox < OW; ox++) {
                const int ix = ox * stride + kx - pad0;
                dst[(size_t)oy * OW + ox] = iy >= 0 && iy < H && ix >= 0 && ix < W ? xc[(size_t)iy * W + ix] : 0.0f;
            }
        }
    }
}

/* dx (C, H, W) = col2im(dcol); one task per input channel, fixed order. */
static void col2im(db_ctx *c, float *dx, const float *dcol, int C, int H, int W, int KH, int KW, int stride, int pad0,
                   int OH, int OW)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int ci = 0; ci < C; ci++) {
        float *dxc = dx + (size_t)ci * H * W;
        memset(dxc, 0, (size_t)H * W * sizeof *dxc);
        for (int ky = 0; ky < KH; ky++)
            for (int kx = 0; kx < KW; kx++) {
                const float *src = dcol + ((size_t)(ci * KH + ky) * KW + kx) * OH * OW;
                for (int oy = 0; oy < OH; oy++) {
                    const int iy = oy * stride + ky - pad0;
                    if (iy < 0 || iy >= H)
                        continue;
                    for (int ox = 0; ox < OW; ox++) {
                        const int ix = ox * stride + kx - pad0;
                        if (ix >= 0 && ix < W)
                            dxc[(size_t)iy * W + ix] += src[(size_t)oy * OW + ox];
                    }
                }
            }
    }
}

int db_cpu_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout, const float *inp,
                           const float *weight, int B, int C, int H, int W, int OC, int KH, int KW, int stride,
                           int pad0, int pad1)
{
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    const int CKK = C * KH * KW, OHW = OH * OW;
    const int direct = KH == 1 && KW == 1 && stride == 1 && pad0 == 0 && pad1 == 0;
    float *col = NULL;
    if (!direct && (dinp || dweight)) {
        col = db_cpu_scratch(c, sizeof(float) * (size_t)CKK * OHW);
        if (!col)
            return db_err_prefix(&c->err, "conv2d backward");
    }
    int s = 0;
    for (int b = 0; b < B && s == 0; b++) {
        const float *dy = dout + (size_t)b * OC * OHW;
        if (dweight) {
            const float *cb = inp + (size_t)b * C * H * W;
            if (!direct) {
                db_cpu_im2col(c, col, cb, C, H, W, KH, KW, stride, pad0, OH, OW);
                cb = col;
            }
            s = db_cpu_sgemm_fixed(c, 1, 'N', 'T', OC, CKK, OHW, 1.0f, dy, OHW, 0, cb, OHW, 0, 1.0f, dweight, CKK, 0);
        }
        if (dinp && s == 0) {
            float *dx = dinp + (size_t)b * C * H * W;
            s = db_cpu_sgemm_fixed(c, 1, 'T', 'N', CKK, OHW, OC, 1.0f, weight, CKK, 0, dy, OHW, 0, 0.0f,
                                   direct ? dx : col, OHW, 0);
            if (!direct && s == 0)
                col2im(c, dx, col, C, H, W, KH, KW, stride, pad0, OH, OW);
        }
    }
    if (s != 0)
        return db_err_prefix(&c->err, "conv2d backward %dx%dx%dx%d -> %d, kernel %dx%d, stride %d, pad %d/%d", B, C,
                             H, W, OC, KH, KW, stride, pad0, pad1);
    if (dbias) {
#pragma omp parallel for num_threads(c->threads) schedule(static)
        for (int o = 0; o < OC; o++) {
            double sum = 0;
            for (int b = 0; b < B; b++) {
                const float *dy = dout + ((size_t)b * OC + o) * OHW;
                for (int i = 0; i < OHW; i++)
                    sum += dy[i];
            }
            dbias[o] += (float)sum;
        }
    }
    return 0;
}
