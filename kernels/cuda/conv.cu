// nn.Conv2d forward and backward on cuDNN (legacy convolution API, NCHW fp32,
// OIHW filters), the twin of kernels/cpu/conv.c and conv_backward.c.
//
// Plans.  Descriptors and the chosen algorithms are built once per shape and
// kept in a list in the ctx state (a UNet has a few dozen conv shapes), so a
// call only queries nothing and launches.  Algorithms come from cuDNN's
// heuristics (the _v7 queries, no trial runs; DB_CUDNN_FIND below for the
// other way), taking the first candidate that:
//   - uses FMA math: the descriptors are set to CUDNN_FMA_MATH, because
//     cuDNN's default math lets fp32 convolutions run on TF32 tensor cores
//     (about 1e-3 relative error, far outside the 1e-5 parity with the CPU);
//   - is deterministic (determinism == CUDNN_DETERMINISTIC): backward data and
//     filter have atomics-based algorithms (ALGO_0, filter ALGO_3) that are not;
//   - needs at most WS_CAP bytes of workspace (from the ctx allocator);
//   - is not FFT based or non-fused Winograd: their fp32 rounding error
//     (transforms of whole tiles) can reach 1e-6..1e-5 relative, the parity
//     bar itself; correctness first, so they are left out until the parity
//     test has measured them on the H100 (a one-line change here).
// A candidate the call then rejects (CUDNN_STATUS_NOT_SUPPORTED) is skipped
// for the next one, and the one that ran is remembered.
//
// DB_CUDNN_FIND=1 (environment, read when a plan is built; opt-in): the
// candidate lists come from cuDNN's trial runs instead (the Find*Ex calls,
// which time each algorithm on the real operands), fastest first, through
// the same filters.  Each kind is searched at its first call, the one that
// has operands in hand, and its list is kept in the plan like the
// heuristics' (a search per shape and kind, per process).  Find writes its
// output, so it gets scratch, never the caller's buffer (the forward's may
// hold the bias for beta 1, the filter gradient is accumulated into), and a
// workspace of up to WS_CAP from the allocator (less when memory is short;
// it counts in the allocator's peak).  When it cannot run, the
// heuristics' list is used: an op never fails for it.  Off by default until
// a GPU run shows it pays: the first call of each shape costs the search,
// and the heuristics may already pick the fastest algorithm.  To measure,
// run the GPU benchmarks with and without it (tests/gpu/run.sh runs
// bench_cuda_ops both ways into bench_ops.md).
//
// Padding.  cuDNN pads symmetrically; the VAE downsampler's (0, 1) padding
// (pad0 != pad1) is done by copying the input into a zero-padded buffer
// (B, C, H+pad0+pad1, W+pad0+pad1) and convolving that unpadded; backward
// data crops the padded gradient back.
//
// Bias: our own kernels (add per channel; the gradient a two-stage sum with a
// fixed order, in double).
//
// bf16 / fp16 (c->precision, kernels/ops.h db_precision): the plan's tensor and
// filter descriptors are in the compute type with float32 compute
// (cuDNN's PSEUDO_HALF / PSEUDO_BFLOAT16 configs: 16-bit data, float32
// accumulation, the output rounded once when cuDNN stores it); inputs are
// converted into scratch (autocast.cu), outputs converted back (exactly).
// Channels-last (since 2026-11-27): the first H200 profile showed cuDNN
// transposing our NCHW bf16 tensors to NHWC and back around every
// convolution (19 % of the bf16 forward, 13 % of a training step), so the
// 16-bit plans describe x, y and the filter as NHWC and our conversion
// passes, which exist anyway, transpose on the way (autocast.cu: 32x32
// tiles): x and dy go to (B, HW, C), y and dx come back to (B, C, HW), the
// filter gradient from (OC, KH, KW, C).  The filter itself is kept in that
// layout in the weights' 16-bit working copy (db_cuda_filter16: registered
// at its first call, rewritten transposed at every rebuild and after the
// fused AdamW).  The fp32 plans stay NCHW.  DB_CONV_NCHW=1 (read when a plan
// is built) keeps the 16-bit plans NCHW, to compare.
// Tensor-core math is allowed in these modes only; fp32 keeps FMA math.  The
// determinism and accuracy filters are the same as in fp32.  The bias enters
// the forward through beta: y is pre-filled with the rounded bias and cuDNN
// computes conv + y in float32 before its single rounding.  The bias gradient
// is the float32 sum of the rounded dout, rounded once, then added.
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda.h"
#include "kernels/cuda/reduce.h"

enum { NCAND = 8 };
static const size_t WS_CAP = (size_t)2 << 30; // bytes of workspace at most

struct db_cuda_conv_plan {
    int key[11]; // B, C, H, W, OC, KH, KW, stride, pad0, pad1, precision (0 = fp32)
    int explicit_pad, Hp, Wp, OH, OW;
    cudnnTensorDescriptor_t x, y; // (B, C, Hp, Wp), (B, OC, OH, OW)
    cudnnFilterDescriptor_t w;    // (OC, C, KH, KW)
    cudnnConvolutionDescriptor_t conv;
    int nfwd, nbd, nbf, have_bwd; // candidates, best first
    int find; // DB_CUDNN_FIND=1 at the plan's build: lists searched at each kind's first call
    int nhwc; // 16-bit plans: x, y and the filter channels-last (DB_CONV_NCHW=1 at the build: not)
    // 16-bit plans: per kind (forward, backward data, backward filter), 1 once
    // cuDNN supported none of the candidates in the compute type; the op then
    // runs the fp32 plan on rounded inputs and rounds its output (same contract)
    int via32[3];
    cudnnConvolutionFwdAlgo_t fwd[NCAND];
    cudnnConvolutionBwdDataAlgo_t bd[NCAND];
    cudnnConvolutionBwdFilterAlgo_t bf[NCAND];
    db_cuda_conv_plan *next;
};

static void plan_destroy(db_cuda_conv_plan *p)
{
    if (p->x)
        cudnnDestroyTensorDescriptor(p->x);
    if (p->y)
        cudnnDestroyTensorDescriptor(p->y);
    if (p->w)
        cudnnDestroyFilterDescriptor(p->w);
    if (p->conv)
        cudnnDestroyConvolutionDescriptor(p->conv);
    free(p);
}

void db_cuda_conv_plans_free(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    while (st->plans) {
        db_cuda_conv_plan *p = st->plans;
        st->plans = p->next;
        plan_destroy(p);
    }
}

// Algorithms kept out for accuracy (see the top of the file).
static bool fwd_ok(cudnnConvolutionFwdAlgo_t a)
{
    return a != CUDNN_CONVOLUTION_FWD_ALGO_FFT && a != CUDNN_CONVOLUTION_FWD_ALGO_FFT_TILING &&
           a != CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED;
}
static bool bd_ok(cudnnConvolutionBwdDataAlgo_t a)
{
    return a != CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT && a != CUDNN_CONVOLUTION_BWD_DATA_ALGO_FFT_TILING &&
           a != CUDNN_CONVOLUTION_BWD_DATA_ALGO_WINOGRAD_NONFUSED;
}
static bool bf_ok(cudnnConvolutionBwdFilterAlgo_t a)
{
    return a != CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT && a != CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT_TILING &&
           a != CUDNN_CONVOLUTION_BWD_FILTER_ALGO_WINOGRAD_NONFUSED;
}

// A candidate's math: FMA only in fp32 (tensor-op math would be TF32);
// tensor cores too on 16-bit data, but never ALLOW_CONVERSION (it may convert
// bf16 operands to fp16 on the way, and fp32 ones to 16 bits).
static bool math_ok(const db_cuda_conv_plan *p, cudnnMathType_t m)
{
    if (p->key[10] != 0)
        return m != CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION;
    return m != CUDNN_TENSOR_OP_MATH && m != CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION;
}

// Appends to a plan's candidates of one kind (algos, *n of them so far) the
// entries of a cuDNN perf list that pass the filters at the top of the file,
// in the list's order, then the kind's fallback, while there is room.  One
// template for the three kinds, whose perf structs and algorithm enums differ
// only in type, so the rules are written once.
template <typename Perf, typename Algo>
static void keep_candidates(const db_cuda_conv_plan *p, const Perf *perf, int got, bool (*allowed)(Algo),
                            Algo fallback, Algo *algos, int *n)
{
    for (int i = 0; i < got && *n < NCAND; i++)
        if (perf[i].status == CUDNN_STATUS_SUCCESS && perf[i].determinism == CUDNN_DETERMINISTIC &&
            math_ok(p, perf[i].mathType) && perf[i].memory <= WS_CAP && allowed(perf[i].algo))
            algos[(*n)++] = perf[i].algo;
    if (*n < NCAND)
        algos[(*n)++] = fallback;
}

// One kind's candidates from cuDNN's heuristics (the _v7 queries, no trial
// runs).  kind 0 forward, 1 backward data, 2 backward filter.
static int heuristic_candidates(db_ctx *c, db_cuda_conv_plan *p, int kind)
{
    db_cuda_state *st = db_cuda_st(c);
    int got = 0;
    if (kind == 0) {
        cudnnConvolutionFwdAlgoPerf_t perf[16];
        DB_CUDNN(c, cudnnGetConvolutionForwardAlgorithm_v7(st->dnn, p->x, p->w, p->conv, p->y, 16, &got, perf));
        // the fallback: always deterministic, no workspace
        keep_candidates(p, perf, got, fwd_ok, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, p->fwd, &p->nfwd);
    } else if (kind == 1) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[16];
        DB_CUDNN(c, cudnnGetConvolutionBackwardDataAlgorithm_v7(st->dnn, p->w, p->y, p->conv, p->x, 16, &got, perf));
        // the fallback: deterministic by cuDNN's documentation
        keep_candidates(p, perf, got, bd_ok, CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, p->bd, &p->nbd);
    } else {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[16];
        DB_CUDNN(c, cudnnGetConvolutionBackwardFilterAlgorithm_v7(st->dnn, p->x, p->y, p->conv, p->w, 16, &got, perf));
        keep_candidates(p, perf, got, bf_ok, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, p->bf, &p->nbf);
    }
    return 0;
}

// db_cuda_alloc for a buffer the caller can do without: NULL when the device
// is out of memory, with no error left behind (neither c->err nor CUDA's
// last error, which the next launch check would otherwise report).
static void *optional_alloc(db_ctx *c, size_t bytes)
{
    void *p = db_cuda_alloc(c, bytes);
    if (!p && c->err.code == DB_ENOMEM) {
        c->err.code = 0;
        c->err.msg[0] = 0;
        cudaGetLastError();
    }
    return p;
}

// DB_CUDNN_FIND=1: one kind's candidates from cuDNN's trial runs (the
// Find*Ex calls time every algorithm on x, w, y, which they only read),
// fastest first, through the same filters and fallback as the heuristics'.
// The trial runs write their output, so they get scratch, never the
// caller's buffer: the forward's may hold the bias for beta 1, and the
// filter gradient is accumulated into.  Their workspace is WS_CAP, halved
// down to WS_CAP / 32 while the allocator has not that much.  Without the
// scratch, or when Find fails, the heuristics' list is taken instead: the
// search may change an op's speed, never whether it runs.
static int find_candidates(db_ctx *c, db_cuda_conv_plan *p, int kind, const void *x, const void *w, const void *y)
{
    db_cuda_state *st = db_cuda_st(c);
    const size_t nout = kind == 0   ? (size_t)p->key[0] * p->key[4] * p->OH * p->OW
                        : kind == 1 ? (size_t)p->key[0] * p->key[1] * p->Hp * p->Wp
                                    : (size_t)p->key[4] * p->key[1] * p->key[5] * p->key[6];
    void *out = optional_alloc(c, nout * (p->key[10] ? 2 : 4)), *work = NULL;
    size_t ws = WS_CAP;
    while (out && !(work = optional_alloc(c, ws)) && ws > WS_CAP / 32)
        ws /= 2;
    cudnnStatus_t s = CUDNN_STATUS_ALLOC_FAILED;
    int got = 0;
    if (work && kind == 0) {
        cudnnConvolutionFwdAlgoPerf_t perf[16];
        s = cudnnFindConvolutionForwardAlgorithmEx(st->dnn, p->x, x, p->w, w, p->conv, p->y, out, 16, &got, perf,
                                                   work, ws);
        if (s == CUDNN_STATUS_SUCCESS)
            keep_candidates(p, perf, got, fwd_ok, CUDNN_CONVOLUTION_FWD_ALGO_IMPLICIT_GEMM, p->fwd, &p->nfwd);
    } else if (work && kind == 1) {
        cudnnConvolutionBwdDataAlgoPerf_t perf[16];
        s = cudnnFindConvolutionBackwardDataAlgorithmEx(st->dnn, p->w, w, p->y, y, p->conv, p->x, out, 16, &got,
                                                        perf, work, ws);
        if (s == CUDNN_STATUS_SUCCESS)
            keep_candidates(p, perf, got, bd_ok, CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, p->bd, &p->nbd);
    } else if (work) {
        cudnnConvolutionBwdFilterAlgoPerf_t perf[16];
        s = cudnnFindConvolutionBackwardFilterAlgorithmEx(st->dnn, p->x, x, p->y, y, p->conv, p->w, out, 16, &got,
                                                          perf, work, ws);
        if (s == CUDNN_STATUS_SUCCESS)
            keep_candidates(p, perf, got, bf_ok, CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, p->bf, &p->nbf);
    }
    db_cuda_free(c, work); // stream order keeps them alive for the trial runs
    db_cuda_free(c, out);
    if (c->err.code != 0) // not a shortage (optional_alloc cleared those): the op fails
        return -1;
    return s == CUDNN_STATUS_SUCCESS ? 0 : heuristic_candidates(c, p, kind);
}

static int plan_init(db_ctx *c, db_cuda_conv_plan *p)
{
    const int B = p->key[0], C = p->key[1], H = p->key[2], W = p->key[3], OC = p->key[4], KH = p->key[5],
              KW = p->key[6], stride = p->key[7], pad0 = p->key[8], pad1 = p->key[9];
    const cudnnDataType_t dt = p->key[10] == DB_PREC_F16    ? CUDNN_DATA_HALF
                               : p->key[10] == DB_PREC_BF16 ? CUDNN_DATA_BFLOAT16
                                                            : CUDNN_DATA_FLOAT;
    p->explicit_pad = pad0 != pad1;
    const int pad = p->explicit_pad ? 0 : pad0;
    p->Hp = p->explicit_pad ? H + pad0 + pad1 : H;
    p->Wp = p->explicit_pad ? W + pad0 + pad1 : W;
    DB_CUDNN(c, cudnnCreateTensorDescriptor(&p->x));
    DB_CUDNN(c, cudnnCreateTensorDescriptor(&p->y));
    DB_CUDNN(c, cudnnCreateFilterDescriptor(&p->w));
    DB_CUDNN(c, cudnnCreateConvolutionDescriptor(&p->conv));
    // 16-bit: channels-last operands unless DB_CONV_NCHW=1 (read once here)
    const char *nchw = getenv("DB_CONV_NCHW");
    p->nhwc = dt != CUDNN_DATA_FLOAT && !(nchw && strcmp(nchw, "1") == 0);
    const cudnnTensorFormat_t fmt = p->nhwc ? CUDNN_TENSOR_NHWC : CUDNN_TENSOR_NCHW;
    DB_CUDNN(c, cudnnSetTensor4dDescriptor(p->x, fmt, dt, B, C, p->Hp, p->Wp));
    DB_CUDNN(c, cudnnSetFilter4dDescriptor(p->w, dt, fmt, OC, C, KH, KW));
    // compute type float32 in every mode (the 16-bit modes: the pseudo configs)
    DB_CUDNN(c, cudnnSetConvolution2dDescriptor(p->conv, pad, pad, stride, stride, 1, 1, CUDNN_CROSS_CORRELATION,
                                                CUDNN_DATA_FLOAT));
    // fp32: no TF32; 16-bit data: tensor cores (products exact, float32 sums)
    DB_CUDNN(c, cudnnSetConvolutionMathType(p->conv, dt == CUDNN_DATA_FLOAT ? CUDNN_FMA_MATH : CUDNN_TENSOR_OP_MATH));
    int n, oc, oh, ow;
    DB_CUDNN(c, cudnnGetConvolution2dForwardOutputDim(p->conv, p->x, p->w, &n, &oc, &oh, &ow));
    p->OH = (H + pad0 + pad1 - KH) / stride + 1;
    p->OW = (W + pad0 + pad1 - KW) / stride + 1;
    if (n != B || oc != OC || oh != p->OH || ow != p->OW)
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "conv2d: cuDNN output %dx%dx%dx%d, expected %dx%dx%dx%d",
                            n, oc, oh, ow, B, OC, p->OH, p->OW);
    DB_CUDNN(c, cudnnSetTensor4dDescriptor(p->y, fmt, dt, B, OC, p->OH, p->OW));
    // read once here, so a plan keeps one way of choosing for its lifetime;
    // with the search on, the lists stay empty until each kind's first call
    // (run_conv), which has the operands the trial runs need
    const char *find = getenv("DB_CUDNN_FIND");
    p->find = find && strcmp(find, "1") == 0;
    return p->find ? 0 : heuristic_candidates(c, p, 0);
}

static int plan_init_backward(db_ctx *c, db_cuda_conv_plan *p)
{
    if (!p->find && (heuristic_candidates(c, p, 1) != 0 || heuristic_candidates(c, p, 2) != 0))
        return -1;
    p->have_bwd = 1;
    return 0;
}

static db_cuda_conv_plan *get_plan(db_ctx *c, const int key[11], int backward)
{
    db_cuda_state *st = db_cuda_st(c);
    db_cuda_conv_plan *p;
    for (p = st->plans; p; p = p->next)
        if (memcmp(p->key, key, sizeof p->key) == 0)
            break;
    if (!p) {
        p = (db_cuda_conv_plan *)calloc(1, sizeof *p);
        if (!p) {
            db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "conv2d: out of host memory");
            return NULL;
        }
        memcpy(p->key, key, sizeof p->key);
        if (plan_init(c, p) != 0) {
            plan_destroy(p);
            return NULL;
        }
        p->next = st->plans;
        st->plans = p;
    }
    if (backward && !p->have_bwd && plan_init_backward(c, p) != 0)
        return NULL;
    return p;
}

// xp (B, C, Hp, Wp) = inp (B, C, H, W) placed at (pad0, pad0), zeros around
__global__ static void pad_kernel(float *xp, const float *inp, size_t BC, int H, int W, int Hp, int Wp, int pad0)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < BC * Hp * Wp;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t bc = i / ((size_t)Hp * Wp);
        const int y = (int)(i / Wp % Hp) - pad0, x = (int)(i % Wp) - pad0;
        xp[i] = y >= 0 && y < H && x >= 0 && x < W ? inp[(bc * H + y) * W + x] : 0.0f;
    }
}

// dinp (B, C, H, W) = dxp (B, C, Hp, Wp) cropped at (pad0, pad0)
__global__ static void crop_kernel(float *dinp, const float *dxp, size_t BC, int H, int W, int Hp, int Wp, int pad0)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < BC * H * W;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t bc = i / ((size_t)H * W);
        const int y = (int)(i / W % H), x = (int)(i % W);
        dinp[i] = dxp[(bc * Hp + y + pad0) * Wp + x + pad0];
    }
}

// out (B, OC, OHW) += bias (OC)
__global__ static void bias_nchw_kernel(float *out, const float *bias, size_t n, int OC, int OHW)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        out[i] += bias[i / OHW % OC];
}

// grid B*OC, block 256.  part (B, OC) = sum over OHW of dout (B, OC, OHW), in
// double; r16: 0 as is, 1 / 2 each element rounded to bf16 / fp16 first (the
// 16-bit modes' rounded dout, without a rounded copy of it in memory)
// (tickets: NULL, or db_cuda_colsum_last's: the last of the B OC blocks
// finishes job jb, whose part is this part (B, OC))
__global__ static void bias_grad_part_kernel(double *part, const float *dout, int OHW, int r16, unsigned *tickets,
                                             db_colsum_job jb)
{
    __shared__ double sh[32];
    const float *d = dout + (size_t)blockIdx.x * OHW;
    double s = 0;
    for (int i = threadIdx.x; i < OHW; i += blockDim.x)
        s += r16 ? db_cuda_round16(d[i], r16 == 2) : d[i];
    s = db_block_sum(s, sh);
    if (threadIdx.x == 0)
        part[blockIdx.x] = s;
    if (tickets && db_cuda_colsum_last(tickets, gridDim.x))
        db_cuda_colsum_finish(jb, 0, jb.C);
}

// dbias (OC) by put from the plane sums of dout (B, OC, OHW): the partials
// (B, OC) and their column sums, in one launch where the ctx has tickets
static int conv_bias_grad(db_ctx *c, float *dbias, const float *dout, int B, int OC, int OHW, int r16, int put)
{
    double *part = (double *)db_cuda_alloc(c, sizeof(double) * (size_t)B * OC);
    if (!part)
        return -1;
    unsigned *tk = db_cuda_tickets(c);
    const db_colsum_job jb{dbias, part, B, OC, r16, put};
    bias_grad_part_kernel<<<B * OC, 256, 0, db_cuda_st(c)->stream>>>(part, dout, OHW, r16, tk, jb);
    const cudaError_t e = cudaGetLastError();
    const int r = e != cudaSuccess
                      ? db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "conv2d bias gradient: %s", cudaGetErrorString(e))
                      : db_cuda_colsum_done(c, tk, jb);
    db_cuda_free(c, part);
    return r;
}

// The padded copy of inp when the plan needs one (else inp itself); *tmp is
// what to free afterwards.
static const float *padded_input(db_ctx *c, const db_cuda_conv_plan *p, const float *inp, float **tmp)
{
    *tmp = NULL;
    if (!p->explicit_pad)
        return inp;
    const int B = p->key[0], C = p->key[1], H = p->key[2], W = p->key[3], pad0 = p->key[8];
    const size_t n = (size_t)B * C * p->Hp * p->Wp;
    float *xp = (float *)db_cuda_alloc(c, n * sizeof(float));
    if (!xp)
        return NULL;
    pad_kernel<<<db_cuda_grid(n, 256), 256, 0, db_cuda_st(c)->stream>>>(xp, inp, (size_t)B * C, H, W, p->Hp, p->Wp,
                                                                        pad0);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) {
        db_cuda_free(c, xp);
        db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "pad_kernel: %s", cudaGetErrorString(e));
        return NULL;
    }
    *tmp = xp;
    return xp;
}

// Runs candidate algorithms in order until one is supported; moves the one
// that ran to the front.  kind 0 forward, 1 backward data, 2 backward filter.
// soft (the 16-bit plans): when every candidate is NOT_SUPPORTED, return 1
// without an error, so the op can take its fp32 fallback.
// x, w, y, out are in the plan's data type (float, or the compute type).
static int run_conv(db_ctx *c, db_cuda_conv_plan *p, int kind, const void *x, const void *w, const void *y,
                    void *out, float beta, int soft)
{
    db_cuda_state *st = db_cuda_st(c);
    const float alpha = 1.0f;
    int *nk = kind == 0 ? &p->nfwd : kind == 1 ? &p->nbd : &p->nbf;
    if (p->find && *nk == 0 && find_candidates(c, p, kind, x, w, y) != 0)
        return -1;
    const int ncand = *nk;
    cudnnStatus_t s = CUDNN_STATUS_NOT_SUPPORTED;
    for (int i = 0; i < ncand; i++) {
        size_t ws = 0;
        if (kind == 0)
            s = cudnnGetConvolutionForwardWorkspaceSize(st->dnn, p->x, p->w, p->conv, p->y, p->fwd[i], &ws);
        else if (kind == 1)
            s = cudnnGetConvolutionBackwardDataWorkspaceSize(st->dnn, p->w, p->y, p->conv, p->x, p->bd[i], &ws);
        else
            s = cudnnGetConvolutionBackwardFilterWorkspaceSize(st->dnn, p->x, p->y, p->conv, p->w, p->bf[i], &ws);
        if (s != CUDNN_STATUS_SUCCESS)
            continue;
        void *work = NULL;
        if (ws && !(work = db_cuda_alloc(c, ws)))
            return -1;
        if (kind == 0)
            s = cudnnConvolutionForward(st->dnn, &alpha, p->x, x, p->w, w, p->conv, p->fwd[i], work, ws, &beta, p->y,
                                        out);
        else if (kind == 1)
            s = cudnnConvolutionBackwardData(st->dnn, &alpha, p->w, w, p->y, y, p->conv, p->bd[i], work, ws, &beta,
                                             p->x, out);
        else
            s = cudnnConvolutionBackwardFilter(st->dnn, &alpha, p->x, x, p->y, y, p->conv, p->bf[i], work, ws, &beta,
                                               p->w, out);
        db_cuda_free(c, work); // stream order keeps it alive for the call
        if (s == CUDNN_STATUS_SUCCESS) {
            if (i > 0) { // remember the one that works
                if (kind == 0) {
                    cudnnConvolutionFwdAlgo_t a = p->fwd[i];
                    p->fwd[i] = p->fwd[0];
                    p->fwd[0] = a;
                } else if (kind == 1) {
                    cudnnConvolutionBwdDataAlgo_t a = p->bd[i];
                    p->bd[i] = p->bd[0];
                    p->bd[0] = a;
                } else {
                    cudnnConvolutionBwdFilterAlgo_t a = p->bf[i];
                    p->bf[i] = p->bf[0];
                    p->bf[0] = a;
                }
            }
            return 0;
        }
        if (s != CUDNN_STATUS_NOT_SUPPORTED)
            break;
    }
    if (soft && s == CUDNN_STATUS_NOT_SUPPORTED)
        return 1;
    static const char *what[3] = {"cudnnConvolutionForward", "cudnnConvolutionBackwardData",
                                  "cudnnConvolutionBackwardFilter"};
    return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "%s (B %d C %d %dx%d OC %d k %dx%d s %d pad %d,%d): %s",
                        what[kind], p->key[0], p->key[1], p->key[2], p->key[3], p->key[4], p->key[5], p->key[6],
                        p->key[7], p->key[8], p->key[9], cudnnGetErrorString(s));
}

// ---- the fp32 convolutions (also the 16-bit modes' fallback) -----------------------

// out (B, OC, OH, OW) = conv(inp, weight), no bias
static int forward32(db_ctx *c, db_cuda_conv_plan *p, float *out, const float *inp, const float *weight)
{
    float *tmp;
    const float *x = padded_input(c, p, inp, &tmp);
    if (!x)
        return -1;
    int r = run_conv(c, p, 0, x, weight, NULL, out, 0.0f, 0);
    db_cuda_free(c, tmp);
    return r ? -1 : 0;
}

// dinp (B, C, H, W) = the data gradient (through a padded buffer when the
// plan pads explicitly)
static int data_grad32(db_ctx *c, db_cuda_conv_plan *p, float *dinp, const float *dout, const float *weight)
{
    const int B = p->key[0], C = p->key[1], H = p->key[2], W = p->key[3], pad0 = p->key[8];
    float *dxp = dinp;
    if (p->explicit_pad && !(dxp = (float *)db_cuda_alloc(c, sizeof(float) * (size_t)B * C * p->Hp * p->Wp)))
        return -1;
    int r = run_conv(c, p, 1, NULL, weight, dout, dxp, 0.0f, 0);
    if (r == 0 && p->explicit_pad) {
        const size_t n = (size_t)B * C * H * W;
        crop_kernel<<<db_cuda_grid(n, 256), 256, 0, db_cuda_st(c)->stream>>>(dinp, dxp, (size_t)B * C, H, W, p->Hp,
                                                                             p->Wp, pad0);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "crop_kernel: %s", cudaGetErrorString(e));
    }
    if (p->explicit_pad)
        db_cuda_free(c, dxp);
    return r ? -1 : 0;
}

// dw (OC, C, KH, KW) = the filter gradient + beta dw
static int filter_grad32(db_ctx *c, db_cuda_conv_plan *p, float *dw, const float *dout, const float *inp, float beta)
{
    float *tmp;
    const float *x = padded_input(c, p, inp, &tmp);
    if (!x)
        return -1;
    int r = run_conv(c, p, 2, x, NULL, dout, dw, beta, 0);
    db_cuda_free(c, tmp);
    return r ? -1 : 0;
}

// The fp32 plan of a 16-bit plan's shape (its fallback)
static db_cuda_conv_plan *plan32(db_ctx *c, const db_cuda_conv_plan *p16, int backward)
{
    int key[11];
    memcpy(key, p16->key, sizeof key);
    key[10] = 0;
    return get_plan(c, key, backward);
}

// ---- bf16 / fp16 --------------------------------------------------------------------

// The input in the compute type, padded when the plan needs it; NULL with
// c->err set.  Free with db_cuda_free.
static void *input16(db_ctx *c, const db_cuda_conv_plan *p, const float *inp)
{
    float *tmp;
    const float *x = padded_input(c, p, inp, &tmp);
    if (!x)
        return NULL;
    void *x16 = p->nhwc ? db_cuda_to16_nhwc(c, x, p->key[0], p->key[1], p->Hp * p->Wp)
                        : db_cuda_to16(c, x, (size_t)p->key[0] * p->key[1] * p->Hp * p->Wp);
    db_cuda_free(c, tmp);
    return x16;
}

// The filter in the compute type, in the plan's layout (a declared weight's
// working copy where it has one)
static void *filter16(db_ctx *c, const db_cuda_conv_plan *p, const float *weight)
{
    const int OC = p->key[4], C = p->key[1], KHW = p->key[5] * p->key[6];
    return p->nhwc ? db_cuda_filter16(c, weight, OC, C, KHW) : db_cuda_to16(c, weight, (size_t)OC * C * KHW);
}

// dst (B, C, HW) float = src in the plan's layout, or by put (DB_PUT_*)
static int from16_plan(db_ctx *c, const db_cuda_conv_plan *p, float *dst, const void *src, int B, int C, int HW,
                       int put)
{
    return p->nhwc ? db_cuda_from16_nchw(c, dst, src, B, C, HW, put)
                   : db_cuda_from16(c, dst, src, (size_t)B * C * HW, put);
}

// add: conv2d_add_forward's addend, joined in the widening pass (the
// channels-last plans only; NULL: none)
static int conv_forward16(db_ctx *c, db_cuda_conv_plan *p, float *out, const float *inp, const float *weight,
                          const float *bias, const float *add = NULL, int per_channel = 0)
{
    const int B = p->key[0], OC = p->key[4];
    const size_t ny = (size_t)B * OC * p->OH * p->OW;
    void *w16 = filter16(c, p, weight), *y16 = db_cuda_alloc(c, ny * 2);
    // y16 prefilled with the rounded bias (cuDNN's beta-1 addend), by the
    // launch that makes the input's channels-last copy where there is one
    const db_cuda_fill_job fill{y16, bias, ny, OC, p->OH * p->OW, p->nhwc};
    db_cuda_nhwc_job xj{NULL, inp, B, p->key[1], p->key[2] * p->key[3]};
    const int with_x = p->nhwc && !p->explicit_pad;
    int r = w16 && y16 ? 0 : -1;
    if (r == 0 && (with_x || bias))
        r = db_cuda_to16_nhwc_jobs(c, &xj, with_x, bias ? &fill : NULL);
    void *x16 = with_x ? xj.dst : r == 0 ? input16(c, p, inp) : NULL;
    if (r == 0 && !x16)
        r = -1;
    if (r == 0)
        r = run_conv(c, p, 0, x16, w16, NULL, y16, bias ? 1.0f : 0.0f, 1);
    if (r == 0)
        r = add ? db_cuda_from16_nchw_add(c, out, y16, B, OC, p->OH * p->OW, add, per_channel)
                : from16_plan(c, p, out, y16, B, OC, p->OH * p->OW, 0);
    db_cuda_free(c, x16);
    db_cuda_free(c, w16);
    db_cuda_free(c, y16);
    return r < 0 ? -1 : r;
}

// The forward through the fp32 plan: conv of the rounded inputs, plus the
// rounded bias, rounded once.
static int conv_forward16_via32(db_ctx *c, db_cuda_conv_plan *p16, float *out, const float *inp, const float *weight,
                                const float *bias)
{
    const int B = p16->key[0], C = p16->key[1], H = p16->key[2], W = p16->key[3], OC = p16->key[4];
    const size_t ny = (size_t)B * OC * p16->OH * p16->OW;
    db_cuda_conv_plan *p = plan32(c, p16, 0);
    float *rx = db_cuda_rounded_copy(c, inp, (size_t)B * C * H * W),
          *rw = db_cuda_rounded_copy(c, weight, (size_t)OC * C * p16->key[5] * p16->key[6]),
          *rb = bias ? db_cuda_rounded_copy(c, bias, (size_t)OC) : NULL;
    int r = p && rx && rw && (rb || !bias) ? 0 : -1;
    if (r == 0)
        r = forward32(c, p, out, rx, rw);
    if (r == 0 && bias) {
        bias_nchw_kernel<<<db_cuda_grid(ny, 256), 256, 0, db_cuda_st(c)->stream>>>(out, rb, ny, OC, p->OH * p->OW);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "bias_nchw_kernel: %s", cudaGetErrorString(e));
    }
    if (r == 0)
        r = db_cuda_round(c, out, out, ny, 0);
    db_cuda_free(c, rx);
    db_cuda_free(c, rw);
    db_cuda_free(c, rb);
    return r ? -1 : 0;
}

// dinp = the data gradient of the 16-bit operands, rounded by cuDNN's store
// (cropped when padded); 1 when cuDNN supports no candidate
// defer (NULL: none): in a channels-last plan without a padded copy, the
// widening is left to the caller: *defer is set to it, and dx16 is the
// caller's to free (defer->src)
static int data_grad16(db_ctx *c, db_cuda_conv_plan *p, float *dinp, const void *dy16, const float *weight,
                       db_cuda_nchw_job *defer)
{
    const int B = p->key[0], C = p->key[1], H = p->key[2], W = p->key[3], pad0 = p->key[8];
    const size_t nxp = (size_t)B * C * p->Hp * p->Wp;
    void *w16 = filter16(c, p, weight), *dx16 = db_cuda_alloc(c, nxp * 2);
    float *dxp = p->explicit_pad ? (float *)db_cuda_alloc(c, nxp * sizeof(float)) : dinp;
    int r = w16 && dx16 && dxp ? 0 : -1;
    if (r == 0)
        r = run_conv(c, p, 1, NULL, w16, dy16, dx16, 0.0f, 1);
    if (r == 0 && defer && p->nhwc && !p->explicit_pad) {
        *defer = db_cuda_nchw_job{dinp, dx16, B, C, p->Hp * p->Wp, DB_PUT_SET};
        db_cuda_free(c, w16);
        return 0;
    }
    if (r == 0)
        r = from16_plan(c, p, dxp, dx16, B, C, p->Hp * p->Wp, 0);
    if (r == 0 && p->explicit_pad) {
        const size_t n = (size_t)B * C * H * W;
        crop_kernel<<<db_cuda_grid(n, 256), 256, 0, db_cuda_st(c)->stream>>>(dinp, dxp, (size_t)B * C, H, W, p->Hp,
                                                                             p->Wp, pad0);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            r = db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "crop_kernel: %s", cudaGetErrorString(e));
    }
    db_cuda_free(c, w16);
    db_cuda_free(c, dx16);
    if (p->explicit_pad)
        db_cuda_free(c, dxp);
    return r;
}

// dweight += the filter gradient of the 16-bit operands, rounded by cuDNN's
// store before the float32 add (put DB_PUT_FRESH: assigned, dweight not
// read); 1 when cuDNN supports no candidate.  x16: the caller's copy of
// inp in the plan's layout (NULL: made here).  defer: as data_grad16's
static int filter_grad16(db_ctx *c, db_cuda_conv_plan *p, float *dweight, const void *dy16, const void *x16,
                         const float *inp, int put, db_cuda_nchw_job *defer)
{
    const size_t nw = (size_t)p->key[4] * p->key[1] * p->key[5] * p->key[6];
    void *own = x16 ? NULL : input16(c, p, inp), *dw16 = db_cuda_alloc(c, nw * 2);
    x16 = x16 ? x16 : own;
    int r = x16 && dw16 ? 0 : -1;
    if (r == 0)
        r = run_conv(c, p, 2, x16, NULL, dy16, dw16, 0.0f, 1);
    if (r == 0 && defer && p->nhwc) {
        *defer = db_cuda_nchw_job{dweight, dw16, p->key[4], p->key[1], p->key[5] * p->key[6], put};
        db_cuda_free(c, own);
        return 0;
    }
    if (r == 0)
        r = from16_plan(c, p, dweight, dw16, p->key[4], p->key[1], p->key[5] * p->key[6], put);
    db_cuda_free(c, own);
    db_cuda_free(c, dw16);
    return r;
}

// The fallbacks through the fp32 plan: rounded inputs, output (contribution)
// rounded.  dinp = round(data gradient); dweight += round(filter gradient).
static int data_grad16_via32(db_ctx *c, db_cuda_conv_plan *p16, float *dinp, const float *dout, const float *weight)
{
    const int B = p16->key[0], C = p16->key[1], OC = p16->key[4];
    const size_t nx = (size_t)B * C * p16->key[2] * p16->key[3];
    db_cuda_conv_plan *p = plan32(c, p16, 1);
    float *rd = db_cuda_rounded_copy(c, dout, (size_t)B * OC * p16->OH * p16->OW),
          *rw = db_cuda_rounded_copy(c, weight, (size_t)OC * C * p16->key[5] * p16->key[6]);
    int r = p && rd && rw ? 0 : -1;
    if (r == 0)
        r = data_grad32(c, p, dinp, rd, rw);
    if (r == 0)
        r = db_cuda_round(c, dinp, dinp, nx, 0);
    db_cuda_free(c, rd);
    db_cuda_free(c, rw);
    return r ? -1 : 0;
}

static int filter_grad16_via32(db_ctx *c, db_cuda_conv_plan *p16, float *dweight, const float *dout,
                               const float *inp, int put)
{
    const int B = p16->key[0], C = p16->key[1], OC = p16->key[4];
    const size_t nw = (size_t)OC * C * p16->key[5] * p16->key[6];
    db_cuda_conv_plan *p = plan32(c, p16, 1);
    float *rd = db_cuda_rounded_copy(c, dout, (size_t)B * OC * p16->OH * p16->OW),
          *rx = db_cuda_rounded_copy(c, inp, (size_t)B * C * p16->key[2] * p16->key[3]),
          *t = (float *)db_cuda_alloc(c, nw * sizeof(float));
    int r = p && rd && rx && t ? 0 : -1;
    if (r == 0)
        r = filter_grad32(c, p, t, rd, rx, 0.0f);
    if (r == 0)
        r = db_cuda_round(c, dweight, t, nw, put);
    db_cuda_free(c, rd);
    db_cuda_free(c, rx);
    db_cuda_free(c, t);
    return r ? -1 : 0;
}

static int conv_backward16(db_ctx *c, db_cuda_conv_plan *p, float *dinp, float *dweight, float *dbias,
                           const float *dout, const float *inp, const float *weight, int assign)
{
    // (DB_ASSIGN_PACK16: dweight's widening packs it, dbias is assigned)
    const int put = db_cuda_put_param(assign), putw = assign == DB_ASSIGN_PACK16 ? (int)DB_PUT_PACK16 : put;
    const int B = p->key[0], OC = p->key[4];
    const size_t ny = (size_t)B * OC * p->OH * p->OW;
    // dout's 16-bit copy, and inp's for the filter gradient with it by one
    // launch (channels-last plans without a padded copy)
    db_cuda_nhwc_job j[2] = {{NULL, dout, B, OC, p->OH * p->OW}, {NULL, inp, B, p->key[1], p->key[2] * p->key[3]}};
    const int both = p->nhwc && !p->explicit_pad && dweight && !p->via32[2];
    int r = p->nhwc ? db_cuda_to16_nhwc_jobs(c, j, 1 + both, NULL) : 0;
    void *dy16 = p->nhwc ? j[0].dst : db_cuda_to16(c, dout, ny), *x16 = j[1].dst;
    if (r == 0 && !dy16)
        r = -1;
    // the two gradients' widenings, where both are left to here: one launch
    db_cuda_nchw_job wj[2];
    int nw = 0;
    if (r == 0 && dinp) { // dinp =
        r = p->via32[1] ? 1 : data_grad16(c, p, dinp, dy16, weight, dweight ? &wj[nw] : NULL);
        nw += r == 0 && dweight && p->nhwc && !p->explicit_pad;
        if (r == 1) {
            p->via32[1] = 1;
            r = data_grad16_via32(c, p, dinp, dout, weight);
        }
    }
    if (r == 0 && dweight) { // dweight += (or = when assign)
        r = p->via32[2] ? 1 : filter_grad16(c, p, dweight, dy16, x16, inp, putw, nw ? &wj[nw] : NULL);
        nw += r == 0 && nw && p->nhwc;
        if (r == 1) {
            p->via32[2] = 1;
            r = filter_grad16_via32(c, p, dweight, dout, inp, putw);
        }
    }
    if (r == 0 && nw)
        r = db_cuda_from16_nchw_jobs(c, wj, nw);
    for (int i = 0; i < nw; i++)
        db_cuda_free(c, (void *)wj[i].src);
    db_cuda_free(c, dy16);
    db_cuda_free(c, x16);
    if (r == 0 && dbias) // float32 sum of the rounded dout per channel, rounded, added
        r = conv_bias_grad(c, dbias, dout, B, OC, p->OH * p->OW, c->precision == DB_PREC_F16 ? 2 : 1, put);
    return r ? -1 : 0;
}

// the forward plan of these sizes in c's precision (NULL with c->err set)
static db_cuda_conv_plan *forward_plan(db_ctx *c, int B, int C, int H, int W, int OC, int KH, int KW, int stride,
                                       int pad0, int pad1)
{
    const int key[11] = {B, C, H, W, OC, KH, KW, stride, pad0, pad1, db_cuda_prec16(c) ? (int)c->precision : 0};
    return get_plan(c, key, 0);
}

extern "C" int db_cuda_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias,
                                      int B, int C, int H, int W, int OC, int KH, int KW, int stride, int pad0,
                                      int pad1)
{
    DB_ENTER(c);
    if (B == 0 || OC == 0)
        return 0;
    db_cuda_conv_plan *p = forward_plan(c, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
    if (!p)
        return -1;
    if (p->key[10]) { // 16-bit; 1: cuDNN has no algorithm for it, the fp32 plan on rounded inputs
        int r = p->via32[0] ? 1 : conv_forward16(c, p, out, inp, weight, bias);
        if (r == 1) {
            p->via32[0] = 1;
            r = conv_forward16_via32(c, p, out, inp, weight, bias);
        }
        return r;
    }
    if (forward32(c, p, out, inp, weight) != 0)
        return -1;
    if (bias) {
        const size_t n = (size_t)B * OC * p->OH * p->OW;
        bias_nchw_kernel<<<db_cuda_grid(n, 256), 256, 0, db_cuda_st(c)->stream>>>(out, bias, n, OC, p->OH * p->OW);
        DB_LAUNCHED(c);
    }
    return 0;
}

// In the 16-bit channels-last plan the addend joins the pass that widens
// cuDNN's output (the same value add_forward / add_channel_forward would
// make of it: one float32 add after the widening); elsewhere the conv, then
// the device's add op (the conv into scratch first when add is out).
extern "C" int db_cuda_conv2d_add_forward(db_ctx *c, float *out, const float *inp, const float *weight,
                                          const float *bias, const float *add, int per_channel, int B, int C, int H,
                                          int W, int OC, int KH, int KW, int stride, int pad0, int pad1)
{
    DB_ENTER(c);
    if (B == 0 || OC == 0)
        return 0;
    db_cuda_conv_plan *p = forward_plan(c, B, C, H, W, OC, KH, KW, stride, pad0, pad1);
    if (!p)
        return -1;
    if (p->key[10] && p->nhwc && !p->via32[0]) {
        const int r = conv_forward16(c, p, out, inp, weight, bias, add, per_channel);
        if (r != 1)
            return r;
        p->via32[0] = 1; // cuDNN has no algorithm for it: as conv2d_forward, the fp32 plan from now on
    }
    const int OHW = p->OH * p->OW;
    const size_t n = (size_t)B * OC * OHW;
    float *t = add == out ? (float *)db_cuda_alloc(c, n * sizeof(float)) : out;
    int r = t ? db_cuda_conv2d_forward(c, t, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, pad1) : -1;
    if (r == 0)
        r = per_channel ? db_cuda_add_channel_forward(c, out, t, add, B, OC, OHW)
                        : db_cuda_add_forward(c, out, t, add, n);
    if (t != out)
        db_cuda_free(c, t);
    return r ? -1 : 0;
}

extern "C" int db_cuda_conv2d_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                       const float *inp, const float *weight, int B, int C, int H, int W, int OC,
                                       int KH, int KW, int stride, int pad0, int pad1, int assign)
{
    DB_ENTER(c);
    if (B == 0 || OC == 0)
        return 0;
    const int key[11] = {B, C, H, W, OC, KH, KW, stride, pad0, pad1, db_cuda_prec16(c) ? (int)c->precision : 0};
    db_cuda_conv_plan *p = get_plan(c, key, 1);
    if (!p)
        return -1;
    if (key[10])
        return conv_backward16(c, p, dinp, dweight, dbias, dout, inp, weight, assign);
    cudaStream_t s = db_cuda_st(c)->stream;
    if (dinp && data_grad32(c, p, dinp, dout, weight) != 0) // dinp (B, C, H, W) =
        return -1;
    // fp32 assign: the reset, then as +=: cuDNN's beta 0 would keep a -0 that the add makes +0
    if (assign && dweight && db_cuda_zero_f32(c, dweight, (size_t)OC * C * KH * KW) != 0)
        return -1;
    if (dweight && filter_grad32(c, p, dweight, dout, inp, 1.0f) != 0) // dweight (OC, C, KH, KW) += (beta 1)
        return -1;
    if (dbias) { // dbias (OC) += sum over B, OH, OW
        if (conv_bias_grad(c, dbias, dout, B, OC, p->OH * p->OW, 0, db_cuda_put_param(assign)))
            return -1;
    }
    return 0;
}
