// The mma.sync products the attention kernels share (attention_mma.cu's
// forward, attention_mma_backward.cu's two passes), on kernels/cuda/mma.h's
// m16n8k16 fragments (lane = 4 g + t) and attention_tc_common.h's tiles
// (BT = 64 streamed rows, rows of LDH compute-type elements in shared
// memory).  The accumulators of a 16 x 64 product are, element for element,
// the A fragments of the next product over those 64, so S, P, dP and dS stay
// in registers.
#ifndef DB_CUDA_ATTENTION_MMA_COMMON_H
#define DB_CUDA_ATTENTION_MMA_COMMON_H

#include "kernels/cuda/attention_tc_common.h"
#include "kernels/cuda/mma.h"

namespace db_attn_mma {

using db_attn_tc::BT;
using db_mma::mma16816;

__device__ __forceinline__ uint32_t pack2(unsigned lo, unsigned hi) { return lo | hi << 16; }

// The warp's 16 rows of xs (row-major, LDH) as A fragments, k-step d
// covering columns 16d .. 16d + 15.  LDSM: one ldmatrix.x4 a k-step (lane
// l gives row l % 8 + 8 (l / 8 % 2), columns 16d + 8 (l / 16) ..), else
// four 32-bit loads; the same words either way.
template <typename T, int NK, bool LDSM>
__device__ __forceinline__ void a_frags(uint32_t (&a)[NK][4], const T *xs, int LDH)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (LDSM) {
        const T *r = xs + (lane % 8 + 8 * (lane / 8 % 2)) * LDH + 8 * (lane / 16);
#pragma unroll
        for (int d = 0; d < NK; d++)
            db_mma::ldsm4<false>(a[d], r + 16 * d);
    } else {
        const T *r0 = xs + g * LDH, *r8 = r0 + 8 * LDH;
#pragma unroll
        for (int d = 0; d < NK; d++) {
            a[d][0] = *(const uint32_t *)(r0 + 16 * d + 2 * t);
            a[d][1] = *(const uint32_t *)(r8 + 16 * d + 2 * t);
            a[d][2] = *(const uint32_t *)(r0 + 16 * d + 8 + 2 * t);
            a[d][3] = *(const uint32_t *)(r8 + 16 * d + 8 + 2 * t);
        }
    }
}

// acc (16 x 64) = A Y^T: A the warp's fragments (16 x HSP), Y the 64 rows of
// ys (row-major, LDH); n-tile nt holds Y's rows 8 nt .. 8 nt + 7.  LDSM:
// one ldmatrix.x4 gives n-tiles nt and nt + 1 their B words of k-step d
// (lane l gives row 8 nt + l % 8 + 8 (l / 16), columns 16d + 8 (l / 8 % 2)
// ..); every acc[nt] sums its k-steps in the same order either way.  MR
// (prod_nt_m): MR such products of the warp's MR row tiles, each B word
// loaded once for all of them.
template <typename T, int NK, bool LDSM, int MR>
__device__ __forceinline__ void prod_nt_m(float (&acc)[MR][BT / 8][4], const uint32_t (&a)[MR][NK][4], const T *ys,
                                          int LDH)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int mr = 0; mr < MR; mr++)
#pragma unroll
        for (int nt = 0; nt < BT / 8; nt++)
            acc[mr][nt][0] = acc[mr][nt][1] = acc[mr][nt][2] = acc[mr][nt][3] = 0.0f;
    if constexpr (LDSM) {
        const T *yl = ys + (lane % 8 + 8 * (lane / 16)) * LDH + 8 * (lane / 8 % 2);
#pragma unroll
        for (int nt = 0; nt < BT / 8; nt += 2)
#pragma unroll
            for (int d = 0; d < NK; d++) {
                uint32_t w[4];
                db_mma::ldsm4<false>(w, yl + 8 * nt * LDH + 16 * d);
                const uint32_t y0[2] = {w[0], w[1]}, y1[2] = {w[2], w[3]};
#pragma unroll
                for (int mr = 0; mr < MR; mr++) {
                    mma16816<T>(acc[mr][nt], a[mr][d], y0);
                    mma16816<T>(acc[mr][nt + 1], a[mr][d], y1);
                }
            }
    } else {
#pragma unroll
        for (int nt = 0; nt < BT / 8; nt++) {
            const T *yr = ys + (8 * nt + g) * LDH + 2 * t;
#pragma unroll
            for (int d = 0; d < NK; d++) {
                const uint32_t yb[2] = {*(const uint32_t *)(yr + 16 * d), *(const uint32_t *)(yr + 16 * d + 8)};
#pragma unroll
                for (int mr = 0; mr < MR; mr++)
                    mma16816<T>(acc[mr][nt], a[mr][d], yb);
            }
        }
    }
}
template <typename T, int NK, bool LDSM>
__device__ __forceinline__ void prod_nt(float (&acc)[BT / 8][4], const uint32_t (&a)[NK][4], const T *ys, int LDH)
{
    prod_nt_m<T, NK, LDSM, 1>(reinterpret_cast<float (&)[1][BT / 8][4]>(acc),
                              reinterpret_cast<const uint32_t (&)[1][NK][4]>(a), ys, LDH);
}

// acc (16 x HSP) += X Y: X the A fragments of a 16 x 64 product (k-step kk
// = its columns 16 kk ..), Y (64 x HSP) row-major in ys (LDH): B fragments
// of one head dimension, two rows a word; padding columns skipped.  LDSM:
// one ldmatrix.x4.trans gives head-dimension tile n its B words of k-steps
// kk and kk + 1 (lane l gives row 16 kk + l, columns 8n ..); else two
// 16-bit loads a word.  Each acc[n] sums its k-steps in order either way.
// MR (prod_nn_m): MR such products, each B word loaded once for all.
template <typename T, int NK, bool LDSM, int MR>
__device__ __forceinline__ void prod_nn_m(float (&acc)[MR][2 * NK][4], const uint32_t (&x)[MR][BT / 16][4],
                                          const T *ys, int LDH, int HC)
{
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    if constexpr (LDSM) {
        const T *yl = ys + lane * LDH;
#pragma unroll
        for (int n = 0; n < 2 * NK; n++) {
            if (n >= HC) // warp-uniform
                break;
#pragma unroll
            for (int kk = 0; kk < BT / 16; kk += 2) {
                uint32_t w[4];
                db_mma::ldsm4<true>(w, yl + 16 * kk * LDH + 8 * n);
                const uint32_t y0[2] = {w[0], w[1]}, y1[2] = {w[2], w[3]};
#pragma unroll
                for (int mr = 0; mr < MR; mr++) {
                    mma16816<T>(acc[mr][n], x[mr][kk], y0);
                    mma16816<T>(acc[mr][n], x[mr][kk + 1], y1);
                }
            }
        }
    } else {
        const unsigned short *yu = (const unsigned short *)ys;
#pragma unroll
        for (int n = 0; n < 2 * NK; n++) {
            if (n >= HC) // warp-uniform
                break;
            const unsigned short *yc = yu + 8 * n + g;
#pragma unroll
            for (int kk = 0; kk < BT / 16; kk++) {
                const int r0 = 16 * kk + 2 * t;
                const uint32_t yb[2] = {pack2(yc[r0 * LDH], yc[(r0 + 1) * LDH]),
                                        pack2(yc[(r0 + 8) * LDH], yc[(r0 + 9) * LDH])};
#pragma unroll
                for (int mr = 0; mr < MR; mr++)
                    mma16816<T>(acc[mr][n], x[mr][kk], yb);
            }
        }
    }
}
template <typename T, int NK, bool LDSM>
__device__ __forceinline__ void prod_nn(float (&acc)[2 * NK][4], const uint32_t (&x)[BT / 16][4], const T *ys,
                                        int LDH, int HC)
{
    prod_nn_m<T, NK, LDSM, 1>(reinterpret_cast<float (&)[1][2 * NK][4]>(acc),
                              reinterpret_cast<const uint32_t (&)[1][BT / 16][4]>(x), ys, LDH, HC);
}

} // namespace db_attn_mma

#endif
