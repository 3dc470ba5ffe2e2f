// Deterministic block reductions: a fixed shuffle tree inside each warp, then
// warp 0 over the per-warp results, so the order of the additions depends
// only on blockDim, never on timing.  Every thread of the block must call
// them (they contain __syncthreads) and gets the result.
#ifndef DB_CUDA_REDUCE_H
#define DB_CUDA_REDUCE_H

#include <math.h>

template <typename T> __device__ __forceinline__ T db_warp_sum(T v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float db_warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// sh: 32 elements of shared memory; blockDim.x a multiple of 32, <= 1024
template <typename T> __device__ T db_block_sum(T v, T *sh)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = db_warp_sum(v);
    __syncthreads(); // sh may still be read by a previous call
    if (lane == 0)
        sh[w] = v;
    __syncthreads();
    if (w == 0) {
        T x = lane < nw ? sh[lane] : (T)0;
        x = db_warp_sum(x);
        if (lane == 0)
            sh[0] = x;
    }
    __syncthreads();
    return sh[0];
}

// db_block_sum over a block of 32 NW threads (NW <= 32), all of them
// computed by one warp: lane l holds v[w], thread 32 w + l's value.  The same additions
// in the same order (each virtual warp's shuffle tree, then the tree over
// the NW warp sums, which db_block_sum's warp 0 takes from lanes < NW), with
// no barrier: the warp's own, so the block's other warps go on meanwhile.
// Every lane gets the sum (a butterfly's lanes all add the same two values).
template <int NW, typename T> __device__ __forceinline__ T db_warp_part_sum(const T (&v)[NW])
{
    const int lane = (int)(threadIdx.x & 31);
    T x = (T)0;
#pragma unroll
    for (int w = 0; w < NW; w++) {
        const T s = db_warp_sum(v[w]);
        if (lane == w)
            x = s;
    }
    return db_warp_sum(x);
}

__device__ __forceinline__ float db_block_max(float v, float *sh)
{
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = db_warp_max(v);
    __syncthreads();
    if (lane == 0)
        sh[w] = v;
    __syncthreads();
    if (w == 0) {
        float x = lane < nw ? sh[lane] : -INFINITY;
        x = db_warp_max(x);
        if (lane == 0)
            sh[0] = x;
    }
    __syncthreads();
    return sh[0];
}

#endif
