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

// The sum over n threads (a multiple of 32, <= 1024) of which the caller is
// thread t: the whole block (db_block_sum), or each of its equal parts at
// once (t = threadIdx.x % n, sh a part's own 32 elements): the same
// additions in the same order either way.  Every thread of the block calls
// it (the barriers are the block's).
template <typename T> __device__ T db_part_sum(T v, T *sh, int t, int n)
{
    const int lane = t & 31, w = t >> 5, nw = n >> 5;
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

// sh: 32 elements of shared memory; blockDim.x a multiple of 32, <= 1024
template <typename T> __device__ T db_block_sum(T v, T *sh) { return db_part_sum(v, sh, (int)threadIdx.x, (int)blockDim.x); }

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
