// One warp-wide tensor-core product, D += A B with A 16x16, B 16x8 (bf16 or
// fp16) and D 16x8 fp32: PTX's mma.sync.aligned.m16n8k16, whose fragment
// layouts are fixed (unlike WMMA's), so a kernel can keep a product's
// result in registers and feed it to the next one (attention_mma.cu).
// Lane = 4 g + t (g = lane / 4, t = lane % 4); each 32-bit register holds
// two 16-bit elements, the lower index in the low half:
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]
//   a[2] = A[g][2t+8, +9]   a[3] = A[g+8][2t+8, +9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// Every lane of the warp must call it.  Under the CPU emulator
// (tests/gpu/emu) the lanes' registers are gathered and each lane computes
// its four sums in k order.
#ifndef DB_CUDA_MMA_H
#define DB_CUDA_MMA_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace db_mma {

template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                                               const uint32_t (&b)[2]);

#ifdef DB_CUDA_EMU_H
template <typename T> static float emu_half(uint32_t w, int hi)
{
    const unsigned short u = (unsigned short)(hi ? w >> 16 : w & 0xffffu);
    T x;
    memcpy(&x, &u, 2);
    if constexpr (std::is_same_v<T, __half>)
        return __half2float(x);
    else
        return __bfloat162float(x);
}
template <typename T> __device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4],
                                                               const uint32_t (&b)[2])
{
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]}, all[32][8];
    emu_warp_gather(mine, 6, all);
    const int lane = emu_lin % 32, g = lane >> 2, t = lane & 3;
    for (int e = 0; e < 4; e++) {
        const int r = g + (e >= 2 ? 8 : 0), n = 2 * t + (e & 1);
        float s = d[e];
        for (int k = 0; k < 16; k++) {
            const float x = emu_half<T>(all[4 * (r & 7) + ((k & 7) >> 1)][(r >= 8) + 2 * (k >= 8)], k & 1);
            const float y = emu_half<T>(all[4 * n + ((k & 7) >> 1)][4 + (k >= 8)], k & 1);
            s += x * y;
        }
        d[e] = s;
    }
}
#else
template <> __device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                                    const uint32_t (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                             const uint32_t (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// ldmatrix.x4: four 8 x 8 matrices of 16-bit elements from shared memory
// in one warp-wide load.  Lanes 8m .. 8m + 7 give the addresses of matrix
// m's rows 0 .. 7 (16 bytes each, 16-byte aligned); lane 4g + t receives,
// two elements a word, the lower index in the low half:
//   plain: r[m] = M_m[g][2t, 2t+1]      TRANS: r[m] = M_m[2t, 2t+1][g]
// i.e. the A or B fragment words of mma16816 above straight from
// row-major tiles (TRANS: B fragments of a tile whose rows are k).  A
// matrix's eight 16-byte rows fall in eight different bank groups when the
// row stride is an odd multiple of 16 bytes (the attention tiles' LDH).
// Every lane of the warp must call it.  Under the CPU emulator the lanes'
// addresses are gathered and each lane reads its elements through them.
#ifdef DB_CUDA_EMU_H
template <bool TRANS> __device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void *row)
{
    const uintptr_t p = (uintptr_t)row;
    if (p % 16) // a misaligned address faults on the card
        emu_refuse("ldmatrix row address %p is not 16-byte aligned", row);
    uint32_t mine[2] = {(uint32_t)p, (uint32_t)(p >> 32)}, all[32][8];
    emu_warp_gather(mine, 2, all);
    const int lane = emu_lin % 32, g = lane >> 2, t = lane & 3;
    auto at = [&](int l) { return (const uint16_t *)(((uintptr_t)all[l][1] << 32) | all[l][0]); };
    for (int m = 0; m < 4; m++)
        r[m] = TRANS ? (uint32_t)at(8 * m + 2 * t)[g] | (uint32_t)at(8 * m + 2 * t + 1)[g] << 16
                     : (uint32_t)at(8 * m + g)[2 * t] | (uint32_t)at(8 * m + g)[2 * t + 1] << 16;
}
#else
template <bool TRANS> __device__ __forceinline__ void ldsm4(uint32_t (&r)[4], const void *row)
{
    const unsigned a = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
}
#endif

} // namespace db_mma

#endif
