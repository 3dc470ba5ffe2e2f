// A CPU emulation of the CUDA kernels in kernels/cuda/, for checking their
// logic (indexing, masking, reductions, barriers, shuffles, the host-side
// plumbing) on a machine without a GPU; tests/gpu/emu/run.sh builds the
// library with it and runs tests/gpu/test_cuda_ops against the CPU ops.
//
// What it does: every CUDA thread is a std::thread, blocks run one at a time
// (so `static` stands in for __shared__), __syncthreads and the warp
// shuffles are std::barriers; device memory is host memory; cuBLAS sgemm
// and the four cuDNN convolution calls are naive double-accumulating
// stand-ins, and so are cublasGemmEx / cublasGemmStridedBatchedEx and the
// cuDNN calls on bf16 / fp16 tensors (autocast: 16-bit operands read through
// cuda_bf16.h / cuda_fp16.h's host conversions, float32 C or a rounded 16-bit
// store; cublasLt's matmul with its bias epilogue likewise), and the
// warp-wide mma.sync of kernels/cuda/mma.h (the lanes'
// registers gathered, each lane's sums in k order).  Host copies inside a
// graph capture are refused here, where a real capture records a copy from
// pageable memory as a node that reads that host buffer again at every
// replay (the H200 found the timestep embedding doing so; only device-side
// checks, such as test_cuda_ops' captured ops, catch that class).  What it
// cannot tell: speed, the GPU's own libm (expf, erff,
// sinf... here are glibc's), memory-model questions beyond plain races
// (ordering between blocks through global memory, fences), cuBLAS/cuDNN
// behaviour (algorithm choice, TF32, determinism).  Plain races between
// the threads of a block (shared memory read before the barrier that
// should order it) it does tell, built with ThreadSanitizer: run.sh --tsan.
// What a card refuses it refuses too, ending the program with a message:
// a launch configuration out of bounds (emu_check_launch), an ldmatrix row
// or a cp.async not 16-byte aligned (mma.h, cp_async.h).  Misaligned vector
// loads (float2, float4, uint4), which x86 allows, only when built with
// UBSan's alignment check: run.sh --align.
// Slow: keep to the small shapes (DB_CUDA_TEST_QUICK=1).
#ifndef DB_CUDA_EMU_H
#define DB_CUDA_EMU_H
#include <cuda_runtime.h>
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cudnn.h>
// before the macros below blank out __device__: their conversions
// (__float2bfloat16_rn, __half2float, ...) are host-callable as they stand
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <atomic>
#include <barrier>
#include <thread>
#include <vector>
#include <mutex>
#include <cstring>
#include <cstdarg>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <functional>
#include <optional>
struct emu_warp { std::barrier<> *bar; uint64_t slot[32]; uint32_t xch[32][8]; };
struct emu_block { std::barrier<> *bar; std::vector<emu_warp> warps; };
extern thread_local uint3 emu_tid, emu_bid; extern dim3 emu_bdim, emu_gdim;
extern thread_local emu_block *emu_blk; extern thread_local int emu_lin;
extern float emu_dyn_smem[1 << 16]; // (128-byte aligned: emu_globals.cpp)
extern std::mutex emu_mtx;
#define threadIdx emu_tid
#define blockIdx emu_bid
#define blockDim emu_bdim
#define gridDim emu_gdim
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) alignas(n)
#define __shared__ static
static inline void __syncthreads() { emu_blk->bar->arrive_and_wait(); }
// one block runs at a time, so what another block wrote is there: the
// fence orders this block's threads only, the atomic is a plain one, and a
// load past L1 is a load (db_cuda_colsum_last's ticket, cuda.h)
static inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
static inline unsigned atomicAdd(unsigned *p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
template <class T> static inline T __ldcg(const T *p) { return *p; }
static inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
template <class T> static T emu_shfl(T v, int src) {
    emu_warp &w = emu_blk->warps[emu_lin / 32];
    uint64_t u = 0; memcpy(&u, &v, sizeof v);
    w.slot[emu_lin % 32] = u;
    w.bar->arrive_and_wait();
    uint64_t r = w.slot[src & 31];
    w.bar->arrive_and_wait();
    T out; memcpy(&out, &r, sizeof out); return out;
}
#define __shfl_xor_sync(m, v, o) emu_shfl((v), (emu_lin % 32) ^ (o))
// Every lane's n (<= 8) 32-bit words, for warp-collective stand-ins such as
// kernels/cuda/mma.h's: all[lane][i] is lane's mine[i].
static inline void emu_warp_gather(const uint32_t *mine, int n, uint32_t (*all)[8]) {
    emu_warp &w = emu_blk->warps[emu_lin / 32];
    memcpy(w.xch[emu_lin % 32], mine, (size_t)n * 4);
    w.bar->arrive_and_wait();
    memcpy(all, w.xch, sizeof w.xch);
    w.bar->arrive_and_wait();
}
#define __shfl_sync(m, v, s) emu_shfl((v), (s))
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
static inline float __fsub_rn(float a, float b) { return a - b; }
static inline float __fdiv_rn(float a, float b) { return a / b; }
static inline float __fsqrt_rn(float a) { return sqrtf(a); }
static inline double __dmul_rn(double a, double b) { return a * b; }
static inline double __dadd_rn(double a, double b) { return a + b; }
static inline double __dsqrt_rn(double a) { return sqrt(a); }
static inline float __double2float_rn(double a) { return (float)a; }
static inline int atomicMin(int *p, int v) { std::lock_guard<std::mutex> g(emu_mtx); int o = *p; if (v < o) *p = v; return o; }
// CUDA's integer min/max device functions (the math headers give the float ones)
static inline int min(int a, int b) { return a < b ? a : b; }
static inline int max(int a, int b) { return a > b ? a : b; }
template <class F> static void emu_launch(dim3 g, dim3 b, F f) {
    emu_gdim = g; emu_bdim = b;
    const int nt = b.x * b.y * b.z;
    for (unsigned z = 0; z < g.z; z++) for (unsigned y = 0; y < g.y; y++) for (unsigned x = 0; x < g.x; x++) {
        emu_block blk; std::barrier<> bb(nt); blk.bar = &bb;
        int nw = (nt + 31) / 32; std::vector<std::unique_ptr<std::barrier<>>> wb;
        blk.warps.resize(nw);
        for (int w = 0; w < nw; w++) { int cnt = std::min(32, nt - 32 * w); wb.emplace_back(new std::barrier<>(cnt)); blk.warps[w].bar = wb.back().get(); }
        std::vector<std::thread> th;
        for (int t = 0; t < nt; t++) th.emplace_back([&, t] {
            emu_bid = make_uint3(x, y, z); emu_tid = make_uint3(t % b.x, t / b.x % b.y, t / (b.x * b.y));
            emu_blk = &blk; emu_lin = t;
            f();
            blk.warps[t / 32].bar->arrive_and_drop(); bb.arrive_and_drop();
        });
        for (auto &t : th) t.join();
    }
}
// Thread-block clusters (kernels/cuda/cluster.h): the cl blocks of a
// cluster run at once, every thread a std::thread as above, each block with
// dynamic shared memory of its own (emu_smem(), which the transform puts
// where a kernel declares `extern __shared__ float smem[]`; outside a
// cluster launch it is emu_dyn_smem), one std::barrier for the whole
// cluster.  1-D grids, clusters along x.
struct emu_cluster { std::barrier<> *bar; void *base[8]; };
extern thread_local emu_cluster *emu_cl;
extern thread_local int emu_cl_rank;
extern thread_local std::optional<std::barrier<>::arrival_token> emu_cl_tok;
extern thread_local float *emu_smem_base;
static inline float *emu_smem() { return emu_smem_base ? emu_smem_base : emu_dyn_smem; }
template <class F> static void emu_launch_cluster(dim3 g, dim3 b, size_t smem, int cl, F f) {
    emu_gdim = g; emu_bdim = b;
    const int nt = b.x * b.y * b.z, nw = (nt + 31) / 32;
    for (unsigned c0 = 0; c0 < g.x; c0 += cl) {
        std::vector<std::vector<double>> mem(cl, std::vector<double>(smem / 8 + 2));
        std::vector<emu_block> blk(cl);
        std::vector<std::unique_ptr<std::barrier<>>> bars;
        std::barrier<> cb(cl * nt);
        emu_cluster info{&cb, {}};
        for (int r = 0; r < cl; r++) {
            info.base[r] = mem[r].data();
            bars.emplace_back(new std::barrier<>(nt)); blk[r].bar = bars.back().get();
            blk[r].warps.resize(nw);
            for (int w = 0; w < nw; w++) { bars.emplace_back(new std::barrier<>(std::min(32, nt - 32 * w))); blk[r].warps[w].bar = bars.back().get(); }
        }
        std::vector<std::thread> th;
        for (int r = 0; r < cl; r++) for (int t = 0; t < nt; t++) th.emplace_back([&, r, t] {
            emu_bid = make_uint3(c0 + r, 0, 0); emu_tid = make_uint3(t % b.x, t / b.x % b.y, t / (b.x * b.y));
            emu_blk = &blk[r]; emu_lin = t; emu_cl = &info; emu_cl_rank = r; emu_smem_base = (float *)info.base[r];
            f();
            blk[r].warps[t / 32].bar->arrive_and_drop(); blk[r].bar->arrive_and_drop(); cb.arrive_and_drop();
            emu_smem_base = NULL; emu_cl = NULL;
        });
        for (auto &t : th) t.join();
    }
}
// Stream capture (CUDA graphs): while emu_cap is set, the work queued on a
// stream (kernels, memset, device-to-device copies, the cuBLAS / cuDNN
// stand-ins) is recorded, not run, and cudaGraphLaunch runs the record in
// order.  Kernel arguments and the cuBLAS / cuDNN scalars are copied at the
// call as CUDA does; what they point to is read when the record runs.  What
// a real capture refuses fails it here too: a stream wait, a copy between
// host and device, cudaFree (emu_cap_bad: cudaStreamEndCapture then fails).
struct emu_graph { std::vector<std::function<void()>> ops; };
extern emu_graph *emu_cap;
extern int emu_cap_bad;
// EMU_LAUNCH_LOG=FILE: each piece of work as it is queued (a kernel, a
// copy, a memset, a cuBLAS / cuDNN stand-in) is a line of FILE, "what
// file:line" of the rewritten source's call (tests/gpu/emu/census.sh counts
// them): the launches an op makes, without a GPU.
// EMU_DRY=1 with it: the work is only listed, never done (the values are
// garbage, the launches an op makes do not depend on them), so a whole
// SD1.5 forward is counted in seconds.
void emu_note(const char *what, const char *file, int line);
extern int emu_dry;
template <class F> static void emu_submit(F f) { if (emu_dry) return; if (emu_cap) emu_cap->ops.emplace_back(f); else f(); }
// a library call whose status is known before it runs (checked by the caller's macro)
template <class F> static auto emu_submit_st(F f, const char *file = __builtin_FILE(), int line = __builtin_LINE()) -> decltype(f()) {
    emu_note("library", file, line);
    if (emu_dry) return decltype(f())(0);
    if (!emu_cap) return f();
    emu_cap->ops.emplace_back([f] { f(); }); return decltype(f())(0); }
static inline cudaError_t emu_forbidden() { emu_cap_bad = 1; return cudaErrorStreamCaptureUnsupported; }
// The end of a run the card would have failed: one message (the first
// thread to get here; the others wait for the abort), then abort().
[[noreturn]] static inline void emu_refuse(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static inline void emu_refuse(const char *fmt, ...) {
    static std::mutex m;
    m.lock(); // (never unlocked)
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cuda_emu: %s\n", msg);
    fflush(stderr);
    abort();
}
// A configuration a GPU refuses (cudaErrorInvalidConfiguration and kin:
// a zero dimension, a grid's y or z over 65535, over 1024 threads a block,
// over the H100's 227 KB of dynamic shared memory; cl > 1: a cluster over
// 8 blocks or a grid not a multiple of it) ends the program here, naming
// the launch: on the card it would be an error the emulator never shows.
static inline void emu_check_launch(dim3 g, dim3 b, size_t smem, int cl) {
    const char *why = !g.x || !g.y || !g.z || !b.x || !b.y || !b.z ? "a zero dimension"
        : g.y > 65535 || g.z > 65535 ? "a grid's y or z over 65535"
        : (size_t)b.x * b.y * b.z > 1024 || b.z > 64 ? "over 1024 threads a block (or z over 64)"
        : smem > 232448 ? "over 227 KB of dynamic shared memory"
        : cl > 8 || g.x % cl ? "a cluster over 8 blocks, or a grid not a multiple of it" : NULL;
    if (why)
        emu_refuse("launch of grid (%u, %u, %u), block (%u, %u, %u), %zu bytes of shared memory, cluster %d: %s "
                   "(a GPU refuses it)", g.x, g.y, g.z, b.x, b.y, b.z, smem, cl, why);
}
// A launch evaluates its configuration and arguments at the call, as CUDA
// copies them then: a graph's replay calls the kernel with those copies,
// never re-reading the expressions (a field of a stack object that is gone
// by then, a counter that moved on).
template <class K, class... A> static void emu_launch_now(const char *name, const char *file, int line, dim3 g, dim3 b, size_t smem, K k, A... a) {
    emu_note(name, file, line);
    emu_check_launch(g, b, smem, 1);
    emu_submit([=] { emu_launch(g, b, [&] { k(a...); }); }); }
#define EMU_LAUNCH(grid, block, smem, stream, kern, ...) \
    emu_launch_now(#kern, __FILE__, __LINE__, dim3(grid), dim3(block), (size_t)(smem), [=](auto... emu_a_) { kern(emu_a_...); } __VA_OPT__(,) __VA_ARGS__)
// runtime stubs: host memory is device memory
#define cudaMalloc(p, n) ((*(void **)(p) = aligned_alloc(256, ((n) + 255) / 256 * 256)) ? cudaSuccess : cudaErrorMemoryAllocation)
#define cudaFree(p) (emu_cap ? emu_forbidden() : (free(p), cudaSuccess))
// the device's memory: 80 GiB, of which EMU_MEM_FREE bytes free (default all)
static inline cudaError_t emu_mem_info(size_t *f, size_t *t) {
    const char *e = getenv("EMU_MEM_FREE");
    *t = (size_t)80 << 30;
    *f = e && *e ? (size_t)strtoull(e, NULL, 10) : *t;
    return cudaSuccess; }
#define cudaMemGetInfo(f, t) emu_mem_info((f), (t))
#define cudaHostAllocPortable 1
#define cudaHostAlloc(p, n, f) ((*(void **)(p) = malloc(n)) ? cudaSuccess : cudaErrorMemoryAllocation)
#define cudaFreeHost(p) (emu_cap ? emu_forbidden() : (free(p), cudaSuccess))
static inline cudaError_t emu_memcpy_async(void *d, const void *s, size_t n, cudaMemcpyKind k, const char *file = __builtin_FILE(), int line = __builtin_LINE()) {
    emu_note("[memcpy]", file, line);
    if (emu_cap && k != cudaMemcpyDeviceToDevice) return emu_forbidden();
    emu_submit([=] { memcpy(d, s, n); }); return cudaSuccess; }
#define cudaMemcpyAsync(d, s, n, k, st) emu_memcpy_async((d), (s), (n), (k))
#define cudaMemcpy(d, s, n, k) (emu_cap ? emu_forbidden() : (memcpy((d), (s), (n)), cudaSuccess))
static inline cudaError_t emu_memset_async(void *p, int v, size_t n, const char *file = __builtin_FILE(), int line = __builtin_LINE()) { emu_note("[memset]", file, line); emu_submit([=] { memset(p, v, n); }); return cudaSuccess; }
#define cudaMemsetAsync(p, v, n, st) emu_memset_async((p), (v), (n))
#define cudaStreamSynchronize(s) (emu_cap ? emu_forbidden() : cudaSuccess)
// graphs: a cudaGraph_t / cudaGraphExec_t is an emu_graph *
#define cudaStreamBeginCapture(s, mode) (emu_cap ? cudaErrorIllegalState : (emu_cap = new emu_graph, emu_cap_bad = 0, cudaSuccess))
static inline cudaError_t emu_end_capture(cudaGraph_t *g) {
    if (!emu_cap) return cudaErrorIllegalState;
    emu_graph *r = emu_cap; emu_cap = NULL;
    if (emu_cap_bad) { delete r; *g = NULL; return cudaErrorStreamCaptureInvalidated; }
    *g = (cudaGraph_t)r; return cudaSuccess; }
#define cudaStreamEndCapture(s, g) emu_end_capture(g)
#define cudaGraphInstantiate(x, g, f) (*(x) = (cudaGraphExec_t) new emu_graph(*(emu_graph *)(g)), cudaSuccess)
#define cudaGraphDestroy(g) (delete (emu_graph *)(g), cudaSuccess)
#define cudaGraphExecDestroy(x) (delete (emu_graph *)(x), cudaSuccess)
static inline cudaError_t emu_graph_launch(cudaGraphExec_t x) {
    if (emu_cap) return emu_forbidden(); // (a real capture could nest it; ours never does)
    for (auto &op : ((emu_graph *)x)->ops) op();
    return cudaSuccess; }
#define cudaGraphLaunch(x, s) emu_graph_launch(x)
#define cudaGetLastError() cudaSuccess
#define cudaGetDeviceCount(n) (*(n) = 1, cudaSuccess)
#define cudaSetDevice(d) cudaSuccess
// an H100's 227 KB (emu_dyn_smem holds 256 KB) and 132 multiprocessors
#define cudaDeviceGetAttribute(v, attr, d) (*(v) = (attr) == cudaDevAttrMaxSharedMemoryPerBlockOptin ? 232448 : (attr) == cudaDevAttrMultiProcessorCount ? 132 : 0, cudaSuccess)
// streams: work is done when queued, so a stream is only a name; each a
// distinct non-null one, as a runtime's are (tests/gpu/test_dist.c tells
// the ctx's stream from its side stream by them)
inline cudaStream_t emu_new_stream() {
    static std::atomic<uintptr_t> n{0};
    return (cudaStream_t)(uintptr_t)(0x1000 + 0x10 * ++n); }
#define cudaStreamCreateWithFlags(s, f) (*(s) = emu_new_stream(), cudaSuccess)
#define cudaStreamDestroy(s) cudaSuccess
#define cudaEventCreateWithFlags(e, f) (*(e) = 0, cudaSuccess)
// (db_cuda_time_ms: bench_cuda_ops under EMU_DRY, its cases run through, every time 0)
#define cudaEventCreate(e) (*(e) = 0, cudaSuccess)
#define cudaEventSynchronize(e) cudaSuccess
#define cudaEventElapsedTime(ms, a, b) (*(ms) = 0.0f, cudaSuccess)
#define cudaEventRecord(e, s) cudaSuccess
#define cudaEventDestroy(e) cudaSuccess
#define cudaStreamWaitEvent(s, e, f) cudaSuccess
#define cudaFuncSetAttribute(...) cudaSuccess
#define cublasCreate(h) (*(h) = 0, CUBLAS_STATUS_SUCCESS)
#define cublasSetStream(h, s) CUBLAS_STATUS_SUCCESS
#define cublasSetMathMode(h, m) CUBLAS_STATUS_SUCCESS
#define cublasDestroy(h) CUBLAS_STATUS_SUCCESS
#define cudnnCreate(h) (*(h) = 0, CUDNN_STATUS_SUCCESS)
#define cudnnSetStream(h, s) CUDNN_STATUS_SUCCESS
#define cudnnDestroy(h) CUDNN_STATUS_SUCCESS
// naive column-major sgemm standing in for cuBLAS
static inline cublasStatus_t emu_sgemm_batched(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const float *alpha, const float *A, int lda, long long sa, const float *B, int ldb, long long sb, const float *beta, float *C, int ldc, long long sc, int batch)
{
    for (int p = 0; p < batch; p++)
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                double s = 0;
                for (int l = 0; l < k; l++) {
                    float a = ta == CUBLAS_OP_N ? A[p * sa + i + (long long)l * lda] : A[p * sa + l + (long long)i * lda];
                    float b = tb == CUBLAS_OP_N ? B[p * sb + l + (long long)j * ldb] : B[p * sb + j + (long long)l * ldb];
                    s += (double)a * b;
                }
                float *c = &C[p * sc + i + (long long)j * ldc];
                *c = *alpha * (float)s + (*beta == 0 ? 0.0f : *beta * *c);
            }
    return CUBLAS_STATUS_SUCCESS;
}
#define cublasSgemm(h, ta, tb, m, n, k, al, A, lda, B, ldb, be, C, ldc) emu_submit_st([=, al_ = *(al), be_ = *(be)] { return emu_sgemm_batched(ta, tb, m, n, k, &al_, A, lda, 0, B, ldb, 0, &be_, C, ldc, 0, 1); })
#define cublasSgemmStridedBatched(h, ta, tb, m, n, k, al, A, lda, sa, B, ldb, sb, be, C, ldc, sc, bc) emu_submit_st([=, al_ = *(al), be_ = *(be)] { return emu_sgemm_batched(ta, tb, m, n, k, &al_, A, lda, sa, B, ldb, sb, &be_, C, ldc, sc, bc); })
// typed element access: 0 float, 1 bf16, 2 fp16; -1 a type the stand-ins do not know
static inline int emu_kind(cudaDataType_t t) { return t == CUDA_R_32F ? 0 : t == CUDA_R_16BF ? 1 : t == CUDA_R_16F ? 2 : -1; }
static inline int emu_kind(cudnnDataType_t t) { return t == CUDNN_DATA_FLOAT ? 0 : t == CUDNN_DATA_BFLOAT16 ? 1 : t == CUDNN_DATA_HALF ? 2 : -1; }
static inline float emu_ld(const void *p, int kind, size_t i) {
    return kind == 0 ? ((const float *)p)[i] : kind == 1 ? __bfloat162float(((const __nv_bfloat16 *)p)[i]) : __half2float(((const __half *)p)[i]); }
static inline void emu_st(void *p, int kind, size_t i, float v) {
    if (kind == 0) ((float *)p)[i] = v; else if (kind == 1) ((__nv_bfloat16 *)p)[i] = __float2bfloat16_rn(v); else ((__half *)p)[i] = __float2half_rn(v); }
// naive cublasGemm(StridedBatched)Ex: A and B of one 16-bit or float type,
// float32 compute (CUBLAS_COMPUTE_32F, float scalars), C float or the A/B type
static inline cublasStatus_t emu_gemm_ex(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void *alpha, const void *A, cudaDataType_t at, int lda, long long sa, const void *B, cudaDataType_t bt, int ldb, long long sb, const void *beta, void *C, cudaDataType_t ct, int ldc, long long sc, int batch, cublasComputeType_t comp)
{
    const int ka = emu_kind(at), kc = emu_kind(ct);
    if (at != bt || ka < 0 || kc < 0 || (kc != 0 && kc != ka) || comp != CUBLAS_COMPUTE_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    const float al = *(const float *)alpha, be = *(const float *)beta;
    for (int p = 0; p < batch; p++)
        for (int j = 0; j < n; j++)
            for (int i = 0; i < m; i++) {
                double s = 0;
                for (int l = 0; l < k; l++) {
                    float a = emu_ld(A, ka, ta == CUBLAS_OP_N ? p * sa + i + (long long)l * lda : p * sa + l + (long long)i * lda);
                    float b = emu_ld(B, ka, tb == CUBLAS_OP_N ? p * sb + l + (long long)j * ldb : p * sb + j + (long long)l * ldb);
                    s += (double)a * b;
                }
                const size_t ci = p * sc + i + (long long)j * ldc;
                emu_st(C, kc, ci, al * (float)s + (be == 0 ? 0.0f : be * emu_ld(C, kc, ci)));
            }
    return CUBLAS_STATUS_SUCCESS;
}
static inline bool emu_gemm_ex_ok(cudaDataType_t at, cudaDataType_t bt, cudaDataType_t ct, cublasComputeType_t comp) {
    const int ka = emu_kind(at), kc = emu_kind(ct);
    return !(at != bt || ka < 0 || kc < 0 || (kc != 0 && kc != ka) || comp != CUBLAS_COMPUTE_32F); }
#define cublasGemmEx(h, ta, tb, m, n, k, al, A, at, lda, B, bt, ldb, be, C, ct, ldc, comp, algo) (!emu_gemm_ex_ok(at, bt, ct, comp) ? CUBLAS_STATUS_NOT_SUPPORTED : emu_submit_st([=, al_ = *(const float *)(al), be_ = *(const float *)(be)] { return emu_gemm_ex(ta, tb, m, n, k, &al_, A, at, lda, 0, B, bt, ldb, 0, &be_, C, ct, ldc, 0, 1, comp); }))
#define cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, al, A, at, lda, sa, B, bt, ldb, sb, be, C, ct, ldc, sc, bc, comp, algo) (!emu_gemm_ex_ok(at, bt, ct, comp) ? CUBLAS_STATUS_NOT_SUPPORTED : emu_submit_st([=, al_ = *(const float *)(al), be_ = *(const float *)(be)] { return emu_gemm_ex(ta, tb, m, n, k, &al_, A, at, lda, sa, B, bt, ldb, sb, &be_, C, ct, ldc, sc, bc, comp); }))
// cublasLt, as gemm.cu's biased 16-bit linears use it: descriptors are host
// structs; cublasLtMatmul is emu_gemm_ex into float32, plus the bias (of
// D's type) under CUBLASLT_EPILOGUE_BIAS, stored rounded as D's type; the
// descriptor is read at the call, as a capture bakes it.
// EMU_LT_UNSUPPORTED=1: the heuristic offers no algorithm (gemm.cu's other path).
struct emu_lt_desc { cublasComputeType_t comp; cublasOperation_t ta, tb; cublasLtEpilogue_t epi; const void *bias; };
struct emu_lt_layout { cudaDataType_t t; uint64_t rows, cols; int64_t ld; };
static inline cublasStatus_t emu_lt_desc_create(cublasLtMatmulDesc_t *d, cublasComputeType_t comp, cudaDataType_t scale) {
    if (scale != CUDA_R_32F) return CUBLAS_STATUS_NOT_SUPPORTED;
    *d = (cublasLtMatmulDesc_t) new emu_lt_desc{comp, CUBLAS_OP_N, CUBLAS_OP_N, CUBLASLT_EPILOGUE_DEFAULT, nullptr};
    return CUBLAS_STATUS_SUCCESS; }
static inline cublasStatus_t emu_lt_desc_set(cublasLtMatmulDesc_t d, cublasLtMatmulDescAttributes_t a, const void *buf, size_t n) {
    emu_lt_desc *e = (emu_lt_desc *)d;
    if (a == CUBLASLT_MATMUL_DESC_TRANSA && n == sizeof(int32_t)) memcpy(&e->ta, buf, n);
    else if (a == CUBLASLT_MATMUL_DESC_TRANSB && n == sizeof(int32_t)) memcpy(&e->tb, buf, n);
    else if (a == CUBLASLT_MATMUL_DESC_EPILOGUE && n == sizeof(uint32_t)) memcpy(&e->epi, buf, n);
    else if (a == CUBLASLT_MATMUL_DESC_BIAS_POINTER && n == sizeof(void *)) memcpy(&e->bias, buf, n);
    else return CUBLAS_STATUS_INVALID_VALUE;
    return CUBLAS_STATUS_SUCCESS; }
#define cublasLtCreate(h) (*(h) = (cublasLtHandle_t)&emu_mtx, CUBLAS_STATUS_SUCCESS)
#define cublasLtDestroy(h) CUBLAS_STATUS_SUCCESS
#define cublasLtMatmulDescCreate(d, comp, scale) emu_lt_desc_create((d), (comp), (scale))
#define cublasLtMatmulDescDestroy(d) (delete (emu_lt_desc *)(d), CUBLAS_STATUS_SUCCESS)
#define cublasLtMatmulDescSetAttribute(d, a, buf, n) emu_lt_desc_set((d), (a), (buf), (n))
#define cublasLtMatrixLayoutCreate(l, t, r, c, ld) (*(l) = (cublasLtMatrixLayout_t) new emu_lt_layout{(t), (uint64_t)(r), (uint64_t)(c), (int64_t)(ld)}, CUBLAS_STATUS_SUCCESS)
#define cublasLtMatrixLayoutDestroy(l) (delete (emu_lt_layout *)(l), CUBLAS_STATUS_SUCCESS)
#define cublasLtMatmulPreferenceCreate(p) (*(p) = (cublasLtMatmulPreference_t)&emu_mtx, CUBLAS_STATUS_SUCCESS)
#define cublasLtMatmulPreferenceDestroy(p) CUBLAS_STATUS_SUCCESS
#define cublasLtMatmulPreferenceSetAttribute(p, a, buf, n) CUBLAS_STATUS_SUCCESS
static inline cublasStatus_t emu_lt_heuristic(cublasLtMatmulHeuristicResult_t *r, int *got) {
    *got = 0;
    if (getenv("EMU_LT_UNSUPPORTED")) return CUBLAS_STATUS_NOT_SUPPORTED;
    memset(r, 0, sizeof *r); r->state = CUBLAS_STATUS_SUCCESS; *got = 1;
    return CUBLAS_STATUS_SUCCESS; }
#define cublasLtMatmulAlgoGetHeuristic(h, op, a, b, c, d, pref, want, r, got) emu_lt_heuristic((r), (got))
static inline cublasStatus_t emu_lt_matmul(const emu_lt_desc &e, float al, const void *A, const emu_lt_layout &la, const void *B, const emu_lt_layout &lb, float be, void *D, const emu_lt_layout &ld) {
    const int m = (int)ld.rows, n = (int)ld.cols, k = (int)(e.ta == CUBLAS_OP_N ? la.cols : la.rows), kd = emu_kind(ld.t);
    // EMU_LT_MATMUL_UNSUPPORTED: a plan the heuristic gave, refused when run
    // (as a card may: the callers' fallback at run time)
    if (getenv("EMU_LT_MATMUL_UNSUPPORTED")) return CUBLAS_STATUS_NOT_SUPPORTED;
    if (be != 0 || la.t != lb.t || kd < 0 || (e.epi != CUBLASLT_EPILOGUE_DEFAULT && e.epi != CUBLASLT_EPILOGUE_BIAS) ||
        (e.epi == CUBLASLT_EPILOGUE_BIAS && !e.bias) || (int)(e.ta == CUBLAS_OP_N ? la.rows : la.cols) != m ||
        (int)(e.tb == CUBLAS_OP_N ? lb.cols : lb.rows) != n || (int)(e.tb == CUBLAS_OP_N ? lb.rows : lb.cols) != k)
        return CUBLAS_STATUS_NOT_SUPPORTED;
    std::vector<float> t((size_t)m * n);
    const float zero = 0;
    const cublasStatus_t s = emu_gemm_ex(e.ta, e.tb, m, n, k, &al, A, la.t, (int)la.ld, 0, B, lb.t, (int)lb.ld, 0, &zero, t.data(), CUDA_R_32F, m, 0, 1, e.comp);
    if (s != CUBLAS_STATUS_SUCCESS) return s;
    for (int j = 0; j < n; j++)
        for (int i = 0; i < m; i++)
            emu_st(D, kd, (size_t)i + (size_t)j * ld.ld, t[(size_t)i + (size_t)j * m] + (e.epi == CUBLASLT_EPILOGUE_BIAS ? emu_ld(e.bias, kd, i) : 0.0f));
    return CUBLAS_STATUS_SUCCESS; }
#define cublasLtMatmul(h, op, al, A, ad, B, bd, be, C, cd, D, dd, algo, ws, wss, st) emu_submit_st([=, e_ = *(const emu_lt_desc *)(op), la_ = *(const emu_lt_layout *)(ad), lb_ = *(const emu_lt_layout *)(bd), ld_ = *(const emu_lt_layout *)(dd), al_ = *(const float *)(al), be_ = *(const float *)(be)] { return emu_lt_matmul(e_, al_, A, la_, B, lb_, be_, D, ld_); })

static inline int emu_dims(cudnnTensorDescriptor_t t, int *n, int *c, int *h, int *w, size_t *st = nullptr) {
    cudnnDataType_t dt; int ns, cs, hs, ws; cudnnGetTensor4dDescriptor(t, &dt, n, c, h, w, &ns, &cs, &hs, &ws);
    if (st) { st[0] = ns; st[1] = cs; st[2] = hs; st[3] = ws; } return emu_kind(dt); }
// the filter's strides (k, c, h, w) from its format: NCHW = KCRS, NHWC = KRSC
static inline int emu_fdims(cudnnFilterDescriptor_t f, int *k, int *c, int *h, int *w, size_t *st = nullptr) {
    cudnnDataType_t dt; cudnnTensorFormat_t fmt; cudnnGetFilter4dDescriptor(f, &dt, &fmt, k, c, h, w);
    if (st && fmt == CUDNN_TENSOR_NHWC) { st[3] = *c; st[2] = (size_t)*w * *c; st[1] = 1; st[0] = (size_t)*h * *w * *c; }
    else if (st) { st[3] = 1; st[2] = *w; st[1] = (size_t)*h * *w; st[0] = (size_t)*c * *h * *w; }
    return emu_kind(dt); }
static inline int emu_cdesc(cudnnConvolutionDescriptor_t cd, int *pad, int *stride) {
    int ph, pw, sh, sw, dh, dw; cudnnConvolutionMode_t m; cudnnDataType_t dt;
    cudnnGetConvolution2dDescriptor(cd, &ph, &pw, &sh, &sw, &dh, &dw, &m, &dt); *pad = ph; *stride = sh; return emu_kind(dt); }
// mode 0: y = conv(x, w); 1: dx = convT(dy, w); 2: dw = corr(x, dy); out = alpha r + beta out.
// Data in the descriptors' type (one type for x, w, y: cuDNN's FLOAT,
// PSEUDO_BFLOAT16 and PSEUDO_HALF configs, float32 compute), the result
// computed in float and stored rounded to it.
static cudnnStatus_t emu_conv(int mode, const float *alpha, cudnnTensorDescriptor_t xd, const void *x,
    cudnnFilterDescriptor_t wd, const void *w, cudnnConvolutionDescriptor_t cd, cudnnTensorDescriptor_t yd, const void *y,
    const float *beta, void *out)
{
    int B, C, H, W, OC, c2, KH, KW, b2, oc2, OH, OW, pad, st;
    size_t xs[4], wsd[4], ys[4]; // element strides of each operand (its layout: NCHW or NHWC)
    const int tx = emu_dims(xd, &B, &C, &H, &W, xs), tw = emu_fdims(wd, &OC, &c2, &KH, &KW, wsd), ty = emu_dims(yd, &b2, &oc2, &OH, &OW, ys), tc = emu_cdesc(cd, &pad, &st);
    if (tx < 0 || tx != tw || tx != ty || tc != 0) return CUDNN_STATUS_NOT_SUPPORTED;
    // EMU_CONV16_UNSUPPORTED=1: cuDNN without 16-bit convolutions, to run
    // conv.cu's fallback (the fp32 plan on rounded inputs)
    if (tx != 0 && getenv("EMU_CONV16_UNSUPPORTED")) return CUDNN_STATUS_NOT_SUPPORTED;
    size_t n = mode == 0 ? (size_t)B*OC*OH*OW : mode == 1 ? (size_t)B*C*H*W : (size_t)OC*C*KH*KW;
    std::vector<double> r(n, 0.0);
    for (int b = 0; b < B; b++) for (int o = 0; o < OC; o++) for (int oy = 0; oy < OH; oy++) for (int ox = 0; ox < OW; ox++)
      for (int ci = 0; ci < C; ci++) for (int ky = 0; ky < KH; ky++) for (int kx = 0; kx < KW; kx++) {
        int iy = oy*st + ky - pad, ix = ox*st + kx - pad; if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
        size_t xi = b*xs[0]+ci*xs[1]+iy*xs[2]+ix*xs[3], wi = o*wsd[0]+ci*wsd[1]+ky*wsd[2]+kx*wsd[3], yi = b*ys[0]+o*ys[1]+oy*ys[2]+ox*ys[3];
        if (mode == 0) r[yi] += (double)emu_ld(x, tx, xi)*emu_ld(w, tx, wi); else if (mode == 1) r[xi] += (double)emu_ld(y, tx, yi)*emu_ld(w, tx, wi); else r[wi] += (double)emu_ld(x, tx, xi)*emu_ld(y, tx, yi);
      }
    for (size_t i = 0; i < n; i++) emu_st(out, tx, i, *alpha * (float)r[i] + (*beta == 0 ? 0.0f : *beta * emu_ld(out, tx, i)));
    return CUDNN_STATUS_SUCCESS;
}
#define cudnnGetConvolutionForwardAlgorithm_v7(h, x, w, c, y, req, got, perf) ((perf)[0].algo = CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_PRECOMP_GEMM, (perf)[0].status = CUDNN_STATUS_SUCCESS, (perf)[0].determinism = CUDNN_DETERMINISTIC, (perf)[0].mathType = CUDNN_FMA_MATH, (perf)[0].memory = 100, (perf)[1].algo = CUDNN_CONVOLUTION_FWD_ALGO_FFT, (perf)[1].status = CUDNN_STATUS_SUCCESS, (perf)[1].determinism = CUDNN_DETERMINISTIC, (perf)[1].mathType = CUDNN_FMA_MATH, (perf)[1].memory = 0, *(got) = 2, CUDNN_STATUS_SUCCESS)
#define cudnnGetConvolutionBackwardDataAlgorithm_v7(h, w, y, c, x, req, got, perf) ((perf)[0].algo = CUDNN_CONVOLUTION_BWD_DATA_ALGO_0, (perf)[0].status = CUDNN_STATUS_SUCCESS, (perf)[0].determinism = CUDNN_NON_DETERMINISTIC, (perf)[0].mathType = CUDNN_FMA_MATH, (perf)[0].memory = 0, *(got) = 1, CUDNN_STATUS_SUCCESS)
#define cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, x, y, c, w, req, got, perf) ((perf)[0].algo = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, (perf)[0].status = CUDNN_STATUS_SUCCESS, (perf)[0].determinism = CUDNN_DETERMINISTIC, (perf)[0].mathType = CUDNN_TENSOR_OP_MATH, (perf)[0].memory = 0, (perf)[1].algo = CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, (perf)[1].status = CUDNN_STATUS_SUCCESS, (perf)[1].determinism = CUDNN_DETERMINISTIC, (perf)[1].mathType = CUDNN_FMA_MATH, (perf)[1].memory = 64, *(got) = 2, CUDNN_STATUS_SUCCESS)
// Find*Ex: the _v7 stand-ins' lists with times, fastest first as cuDNN sorts
// them.  Like cuDNN's trial runs they write their output, here with NaN in
// every type, so that conv.cu handing Find the caller's buffer (the forward's
// bias for beta 1, the accumulated filter gradient) fails the parity checks;
// EMU_CONV16_UNSUPPORTED refuses 16-bit searches as it does the convolutions.
static inline cudnnStatus_t emu_find_out(int kind, size_t n, void *out) {
    if (emu_cap) { emu_cap_bad = 1; return CUDNN_STATUS_NOT_SUPPORTED; } // the trial runs wait for the device
    if (kind < 0 || (kind != 0 && getenv("EMU_CONV16_UNSUPPORTED"))) return CUDNN_STATUS_NOT_SUPPORTED;
    memset(out, 0xff, n * (kind ? 2 : 4)); return CUDNN_STATUS_SUCCESS; }
static inline cudnnStatus_t emu_find_out(cudnnTensorDescriptor_t d, void *out) { int n, c, h, w; int k = emu_dims(d, &n, &c, &h, &w); return emu_find_out(k, (size_t)n*c*h*w, out); }
static inline cudnnStatus_t emu_find_out(cudnnFilterDescriptor_t d, void *out) { int n, c, h, w; int k = emu_fdims(d, &n, &c, &h, &w); return emu_find_out(k, (size_t)n*c*h*w, out); }
template <class Perf> static cudnnStatus_t emu_find(cudnnStatus_t wrote, int got, Perf *perf) {
    for (int i = 0; i < got; i++) perf[i].time = 0.1f * (i + 1);
    return wrote; }
#define cudnnFindConvolutionForwardAlgorithmEx(h, xd, x, wd, w, cd, yd, y, req, got, perf, wk, ws) (cudnnGetConvolutionForwardAlgorithm_v7(h, xd, wd, cd, yd, req, got, perf), emu_find(emu_find_out(yd, y), *(got), perf))
#define cudnnFindConvolutionBackwardDataAlgorithmEx(h, wd, w, yd, y, cd, xd, x, req, got, perf, wk, ws) (cudnnGetConvolutionBackwardDataAlgorithm_v7(h, wd, yd, cd, xd, req, got, perf), emu_find(emu_find_out(xd, x), *(got), perf))
#define cudnnFindConvolutionBackwardFilterAlgorithmEx(h, xd, x, yd, y, cd, wd, w, req, got, perf, wk, ws) (cudnnGetConvolutionBackwardFilterAlgorithm_v7(h, xd, yd, cd, wd, req, got, perf), emu_find(emu_find_out(wd, w), *(got), perf))
#define cudnnGetConvolutionForwardWorkspaceSize(h, x, w, c, y, a, ws) (*(ws) = 1000, CUDNN_STATUS_SUCCESS)
#define cudnnGetConvolutionBackwardDataWorkspaceSize(h, w, y, c, x, a, ws) (*(ws) = 0, CUDNN_STATUS_SUCCESS)
#define cudnnGetConvolutionBackwardFilterWorkspaceSize(h, x, y, c, w, a, ws) (*(ws) = (a) == CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3 ? 64 : 0, CUDNN_STATUS_SUCCESS)
// the types check of emu_conv, made at the call (a capture records only what runs)
static inline cudnnStatus_t emu_conv_ok(cudnnTensorDescriptor_t xd, cudnnFilterDescriptor_t wd, cudnnConvolutionDescriptor_t cd, cudnnTensorDescriptor_t yd) {
    int B, C, H, W, OC, c2, KH, KW, b2, oc2, OH, OW, pad, st;
    const int tx = emu_dims(xd, &B, &C, &H, &W), tw = emu_fdims(wd, &OC, &c2, &KH, &KW), ty = emu_dims(yd, &b2, &oc2, &OH, &OW), tc = emu_cdesc(cd, &pad, &st);
    if (tx < 0 || tx != tw || tx != ty || tc != 0) return CUDNN_STATUS_NOT_SUPPORTED;
    if (tx != 0 && getenv("EMU_CONV16_UNSUPPORTED")) return CUDNN_STATUS_NOT_SUPPORTED;
    return CUDNN_STATUS_SUCCESS; }
#define EMU_CONV(mode, al, xd, x, wd, w, cd, yd, y, be, out) (emu_conv_ok(xd, wd, cd, yd) != CUDNN_STATUS_SUCCESS ? CUDNN_STATUS_NOT_SUPPORTED : emu_submit_st([=, al_ = *(al), be_ = *(be)] { return emu_conv(mode, &al_, xd, x, wd, w, cd, yd, y, &be_, out); }))
#define cudnnConvolutionForward(h, al, xd, x, wd, w, cd, a, wk, ws, be, yd, y) EMU_CONV(0, al, xd, x, wd, w, cd, yd, (const void *)NULL, be, y)
#define cudnnConvolutionBackwardData(h, al, wd, w, yd, y, cd, a, wk, ws, be, xd, x) ((a) == CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 ? CUDNN_STATUS_EXECUTION_FAILED : EMU_CONV(1, al, xd, (const void *)NULL, wd, w, cd, yd, y, be, x))
#define cudnnConvolutionBackwardFilter(h, al, xd, x, yd, y, cd, a, wk, ws, be, wd, w) EMU_CONV(2, al, xd, x, wd, (const void *)NULL, cd, yd, y, be, w)
// ---- nvcuda::wmma stand-in (kernels/cuda/attention_tc.cu) ---------------
// Every emulated thread holds the WHOLE 16x16 tile in its fragment (row-major
// in x[]): legal, since WMMA leaves the element -> (row, col) mapping of a
// fragment unspecified, so a kernel that is right under any mapping is right
// here.  load/store/mma are done by each thread for itself (a store writes
// the whole tile, every thread the same values); mma accumulates in float
// in k order (the tensor cores' internal rounding differs, within fp32
// accuracy).  bf16/fp16 elements convert through the host functions of
// cuda_bf16.h / cuda_fp16.h.  Also __syncwarp, as the warp's barrier.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <type_traits>
static inline void __syncwarp(unsigned = 0xffffffffu) { emu_blk->warps[emu_lin / 32].bar->arrive_and_wait(); }
namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
static inline float emu_f(float x) { return x; }
static inline float emu_f(__nv_bfloat16 x) { return __bfloat162float(x); }
static inline float emu_f(__half x) { return __half2float(x); }
template <class Use, int M, int N, int K, class T, class L = void> struct fragment {
    static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M, cols = std::is_same_v<Use, matrix_a> ? K : N;
    static constexpr int num_elements = rows * cols;
    T x[rows * cols]; // (r, c) at x[r * cols + c]
};
template <class F, class P> static void emu_wmma_ld(F &f, const P *p, unsigned ldm, bool colm) {
    for (int r = 0; r < F::rows; r++) for (int c = 0; c < F::cols; c++)
        f.x[r * F::cols + c] = colm ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c];
}
template <class Use, int M, int N, int K, class T, class L>
static void load_matrix_sync(fragment<Use, M, N, K, T, L> &f, const T *p, unsigned ldm) {
    static_assert(!std::is_same_v<L, void>, "matrix_a/b fragments name their layout");
    emu_wmma_ld(f, p, ldm, std::is_same_v<L, col_major>);
}
template <int M, int N, int K, class T>
static void load_matrix_sync(fragment<accumulator, M, N, K, T> &f, const T *p, unsigned ldm, layout_t lay) {
    emu_wmma_ld(f, p, ldm, lay == mem_col_major);
}
// Every lane holds the whole fragment here, so one lane stores it and the
// warp waits for it (a store by all 32 lanes at once would be a race of
// equal values, which the ThreadSanitizer build, run.sh --tsan, reports).
template <int M, int N, int K, class T>
static void store_matrix_sync(T *p, const fragment<accumulator, M, N, K, T> &f, unsigned ldm, layout_t lay) {
    if (emu_lin % 32 == 0)
        for (int r = 0; r < M; r++) for (int c = 0; c < N; c++)
            (lay == mem_col_major ? p[(size_t)c * ldm + r] : p[(size_t)r * ldm + c]) = f.x[r * N + c];
    emu_blk->warps[emu_lin / 32].bar->arrive_and_wait();
}
template <class F, class V> static void fill_fragment(F &f, const V &v) { for (auto &e : f.x) e = v; }
template <int M, int N, int K, class T, class LA, class LB, class TC>
static void mma_sync(fragment<accumulator, M, N, K, TC> &d, const fragment<matrix_a, M, N, K, T, LA> &a,
                     const fragment<matrix_b, M, N, K, T, LB> &b, const fragment<accumulator, M, N, K, TC> &c) {
    TC t[M * N];
    for (int i = 0; i < M; i++) for (int j = 0; j < N; j++) {
        float s = c.x[i * N + j];
        for (int q = 0; q < K; q++) s += emu_f(a.x[i * K + q]) * emu_f(b.x[q * N + j]);
        t[i * N + j] = s;
    }
    memcpy(d.x, t, sizeof t);
}
} } // namespace nvcuda::wmma
// ---- end of the wmma stand-in ---------------------------------------------
#endif
