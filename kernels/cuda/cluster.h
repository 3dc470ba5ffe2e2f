// Thread-block clusters (sm_90): a launch whose blocks come in groups of
// `cl` that run at the same time on one GPC, each block able to read the
// others' shared memory (distributed shared memory) and to wait for them
// at a cluster-wide barrier.  Group norm's whole-group kernels (norm.cu)
// split a group over a cluster so that a batch of two (64 groups) fills
// the card's 132 multiprocessors rather than half of them.
//
//   launch(kern, grid, block, smem, stream, cl, args...): grid blocks in
//       clusters of cl along x (grid a multiple of cl); cl 1 is a plain launch
//   fits(kern, block, smem, cl): whether the card can run such clusters at all
//   rank(): this block's rank in its cluster, 0 .. cl - 1
//   sync(): every thread of the cluster, memory ordered (release / acquire)
//   arrive() ... wait(): sync() in two halves: what a block did before
//       arrive() is seen by the others after their wait(); a block that reads
//       another's shared memory must do so before its arrive(), and wait()
//       before it exits (its own shared memory must outlive the others' reads)
//   map(p, r): p, an address in this block's dynamic shared memory, in
//       block r's (read it with plain loads)
//
// A kernel launched in clusters keeps its shared state in dynamic shared
// memory only: the CPU emulator (tests/gpu/emu) runs a cluster's blocks at
// once, each with dynamic shared memory of its own, while a `__shared__`
// variable there is one `static` for all of them.
#ifndef DB_CUDA_CLUSTER_H
#define DB_CUDA_CLUSTER_H

#include <cuda_runtime.h>

namespace db_cl {

#ifdef DB_CUDA_EMU_H
__device__ __forceinline__ unsigned rank() { return (unsigned)emu_cl_rank; }
__device__ __forceinline__ void sync() { emu_cl->bar->arrive_and_wait(); }
__device__ __forceinline__ void arrive() { emu_cl_tok.emplace(emu_cl->bar->arrive()); }
__device__ __forceinline__ void wait()
{
    emu_cl->bar->wait(std::move(*emu_cl_tok));
    emu_cl_tok.reset();
}
template <typename T> __device__ __forceinline__ T *map(T *p, unsigned r)
{
    return (T *)((char *)emu_cl->base[r] + ((char *)p - (char *)emu_cl->base[emu_cl_rank]));
}
template <typename... KA, typename... AA>
static cudaError_t launch(void (*kern)(KA...), int grid, int block, size_t smem, cudaStream_t, int cl, AA... args)
{
    emu_note("[cluster launch]", __FILE__, __LINE__);
    emu_check_launch(dim3(grid), dim3(block), smem, cl);
    emu_submit([=] { emu_launch_cluster(dim3(grid), dim3(block), smem, cl, [&] { kern(args...); }); });
    return cudaSuccess;
}
template <typename K> static bool fits(K, int, size_t, int) { return true; }
#else
__device__ __forceinline__ unsigned rank() { return __clusterRelativeBlockRank(); }
__device__ __forceinline__ void sync()
{
    __cluster_barrier_arrive();
    __cluster_barrier_wait();
}
__device__ __forceinline__ void arrive() { __cluster_barrier_arrive(); }
__device__ __forceinline__ void wait() { __cluster_barrier_wait(); }
template <typename T> __device__ __forceinline__ T *map(T *p, unsigned r)
{
    return (T *)__cluster_map_shared_rank((void *)p, r);
}
// a launch of grid blocks in clusters of cl (at[0] the cluster attribute)
static cudaLaunchConfig_t config(int grid, int block, size_t smem, cudaStream_t st, int cl, cudaLaunchAttribute *at)
{
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((unsigned)grid);
    cfg.blockDim = dim3((unsigned)block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    at[0].id = cudaLaunchAttributeClusterDimension;
    at[0].val.clusterDim.x = (unsigned)cl;
    at[0].val.clusterDim.y = 1;
    at[0].val.clusterDim.z = 1;
    cfg.attrs = at;
    cfg.numAttrs = cl > 1 ? 1 : 0;
    return cfg;
}
template <typename... KA, typename... AA>
static cudaError_t launch(void (*kern)(KA...), int grid, int block, size_t smem, cudaStream_t st, int cl, AA... args)
{
    cudaLaunchAttribute at[1];
    const cudaLaunchConfig_t cfg = config(grid, block, smem, st, cl, at);
    return cudaLaunchKernelEx(&cfg, kern, args...);
}
// (a host query, allowed while a stream is being captured; any error it
// leaves is cleared: the answer is then no)
template <typename K> static bool fits(K kern, int block, size_t smem, int cl)
{
    if (cl <= 1)
        return true;
    cudaLaunchAttribute at[1];
    const cudaLaunchConfig_t cfg = config(cl, block, smem, 0, cl, at);
    int n = 0;
    if (cudaOccupancyMaxActiveClusters(&n, (void *)kern, &cfg) != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return n > 0;
}
#endif

} // namespace db_cl

#endif
