// The optimizer ops of kernels/ops.h (db_opt_adamw, db_opt_sumsq,
// db_opt_sumsq_many, db_opt_scale) on the device, bit-identical to libcommon/sd/optim.c, their
// CPU oracle (tests/gpu/test_cuda_ops.c checks the bits).
//
// No fused multiply-add anywhere: every operation is an explicit
// round-to-nearest intrinsic (__fmul_rn, __fadd_rn, __fdiv_rn, __fsqrt_rn,
// __dmul_rn, __dadd_rn), which nvcc never contracts, so the file does not
// depend on -fmad or on the optimisation level (a plain a * b + c would
// become an FMA under nvcc's default -fmad=true and differ from the CPU in
// the last bit).  The library is also built without --use_fast_math, but
// the intrinsics make the IEEE division and square root explicit here.
//
// Deterministic: every output element is written by one thread; the sum of
// squares reduces in a fixed order and uses no atomics.
#include <limits.h>
#include <math.h>

#include "kernels/cuda/cuda.h"
#include "libcommon/sd/adamw_coef.h"

enum { THREADS = 256 };

#define GRID_STRIDE(i, n)                                                                                              \
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// ---- AdamW ----------------------------------------------------------------------------

// A step's scalars as a kernel receives them: by value, made on the host
// when the op is called, or (hp->coefs, optim.h) a pointer into device
// memory read when the kernel runs, so a graph's replay takes the values
// written before it.
struct adamw_scalars {
    db_adamw_coef v;
    const db_adamw_coef *at;
};
static adamw_scalars adamw_scalars_of(const struct db_adamw *hp, int64_t t)
{
    // on the host in double, by the very function optim.c calls
    // (adamw_coef.h), so they carry the same bits
    return hp->coefs ? adamw_scalars{db_adamw_coef{}, hp->coefs} : adamw_scalars{db_adamw_coefs(hp, t), NULL};
}
__device__ __forceinline__ static db_adamw_coef adamw_scalars_now(const adamw_scalars &s)
{
    return s.at ? *s.at : s.v;
}

// optim.c's adamw_elem, one element per iteration, the same operations in the
// same order (torch 1.13's _single_tensor_adamw):
//   p = p*decay; m = m*b1 + (1-b1)*g; v = v*b2 + ((1-b2)*g)*g;
//   d = sqrt(v)/sqrt(bc2) + eps; p = p + (-step_size*m)/d
// shadow: the weights' 16-bit working copy (db_cuda_shadow) to keep current
// in the same pass, of type f16 ? fp16 : bf16; NULL when there is none.
// One element: the new weight from p, g, and m and v updated in place (the
// fp32 kernels' and the 8-bit one's, there on dequantised moments).
__device__ __forceinline__ static float adamw_elem(float p, float g, float &m, float &v, const db_adamw_coef &k)
{
    if (k.grad_coef != 0.0f) // clipping's scaling, folded in (optim.h grad_coef): scale_kernel's multiplication
        g = __fmul_rn(g, k.grad_coef);
    float pi = __fmul_rn(p, k.decay);
    m = __fadd_rn(__fmul_rn(m, k.b1), __fmul_rn(k.one_minus_b1, g));
    v = __fadd_rn(__fmul_rn(v, k.b2), __fmul_rn(__fmul_rn(k.one_minus_b2, g), g));
    const float d = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), k.bc2_sqrt), k.eps);
    return __fadd_rn(pi, __fdiv_rn(__fmul_rn(k.neg_step_size, m), d));
}

// Offset l inside a filter (OC, C, KHW) of per = C KHW elements a row: its
// row oc, channel cc and tap kk; and the channels-last offset (OC, KHW, C)
// of (oc, cc, kk) (autocast.cu's to16_nhwc layout)
struct filter_at {
    unsigned oc, cc, kk;
};
__device__ __forceinline__ static filter_at filter_split(unsigned l, unsigned per, unsigned KHW)
{
    filter_at a;
    a.oc = l / per;
    const unsigned rem = l - a.oc * per;
    a.cc = rem / KHW, a.kk = rem - a.cc * KHW;
    return a;
}
__device__ __forceinline__ static size_t filter_nhwc(unsigned oc, unsigned cc, unsigned kk, unsigned per, unsigned C)
{
    return (size_t)oc * per + (size_t)kk * C + cc;
}

// Where element o of a declared buffer goes in its working copy: its own
// place, or, inside a registered filter (OC, C, KHW), its channels-last
// place (OC, KHW, C).  h: the filter of fr (sorted by offset) that starts
// last at or before o, -1 for none.
__device__ __forceinline__ static size_t shadow_place(size_t o, const db_cuda_filter_range *fr, int h)
{
    if (h < 0)
        return o;
    const db_cuda_filter_range f = fr[h];
    const unsigned per = (unsigned)f.C * (unsigned)f.KHW;
    if (o - f.off >= (size_t)f.OC * per)
        return o;
    const filter_at a = filter_split((unsigned)(o - f.off), per, (unsigned)f.KHW);
    return f.off + filter_nhwc(a.oc, a.cc, a.kk, per, (unsigned)f.C);
}

// A chunk wholly inside one registered filter (OC, C, KHW), KHW 2 ..
// ADAMW_KHW, whose ADAMW_CHUNK elements lie on at most ADAMW_ROWS of its
// output-channel rows (3x3 filters of 152 input channels and up: all of
// SD1.5's but conv_in's) has its 16-bit copies staged in shared memory and
// written out run by run: in row oc the chunk covers channels [cc_lo,
// cc_hi] of each tap kk, which are consecutive in the channels-last copy
// (OC, KHW, C), so a warp stores 64 consecutive bytes where it stored 32
// scattered 2-byte values (63 % of SD1.5's weights are such filters; the
// H200 spent 7.8 ms a step in this kernel, ~1.4 ms over its fp32 traffic).
// Rows r of the chunk: slots [sbase[r], sbase[r + 1]) hold (kk, cc) at
// sbase[r] + kk W[r] + cc - cclo[r]; a slot whose element (cc KHW + kk)
// lies outside the row's part of the chunk [a[r], b[r]) is not written.
enum { ADAMW_CHUNK = 4096, ADAMW_ROWS = 4, ADAMW_KHW = 9 };
static_assert(ADAMW_ROWS == 4, "adamw_kernel finds a staged element's row by three compares");
struct adamw_stage {
    int fast, nrows;
    int plain;                        // the chunk meets no filter: every copy at its own place
    size_t row0;                      // the chunk's first row's first element, buffer offset
    unsigned per, C, KHW;             // C KHW; the filter's shape
    unsigned sbase[ADAMW_ROWS + 1], W[ADAMW_ROWS], cclo[ADAMW_ROWS], a[ADAMW_ROWS], b[ADAMW_ROWS];
    unsigned mKHW, mW[ADAMW_ROWS];    // magic multipliers of KHW and W[r] (adamw_div)
};

// n / d for n, d < 2^16 by a multiply-high with m = ceil(2^32 / d): the
// error n (m d - 2^32) / (d 2^32) stays under n / 2^32 < 2^-16 < 1 / d, so
// it never carries the quotient past an integer: exact.  (The staged
// AdamW's index arithmetic divided by the filter's row length and tap count
// per element; an integer division is ~20 instructions, the kernel has
// ~150 a filter element, and call 6's float4 loads and session 13's staged
// stores each left its 7.8 ms unchanged: issue, not bytes, is the suspect.)
// ceil(2^32 / d) is floor((2^32 - 1) / d) + 1 for d > 1 (a 32-bit division,
// once a chunk); d 1 (a row holding one channel) is 0, the quotient n itself
__device__ __forceinline__ static unsigned adamw_magic(unsigned d) { return d > 1 ? 0xffffffffu / d + 1 : 0; }
__device__ __forceinline__ static unsigned adamw_div(unsigned n, unsigned m) { return m ? __umulhi(n, m) : n; }

// thread 0: whether chunk [o0, o1) (buffer offsets) of filter f (NULL: none
// starts at or before o0) takes the staged path, and its rows' layout
__device__ static void adamw_stage_plan(adamw_stage *st, const db_cuda_filter_range *f, size_t o0, size_t o1)
{
    st->fast = 0;
    if (!f || f->KHW < 2 || f->KHW > ADAMW_KHW)
        return;
    const unsigned per = (unsigned)f->C * (unsigned)f->KHW;
    if (o1 > f->off + (size_t)f->OC * per || per >= 65536)
        return; // (o0 >= f->off: f starts at or before the chunk; per < 2^16: adamw_div's range)
    const size_t l0 = o0 - f->off, l1 = o1 - f->off;
    const size_t oc0 = l0 / per, oc1 = (l1 - 1) / per;
    if (oc1 - oc0 >= ADAMW_ROWS)
        return;
    st->nrows = (int)(oc1 - oc0 + 1);
    st->row0 = f->off + oc0 * per;
    st->per = per, st->C = (unsigned)f->C, st->KHW = (unsigned)f->KHW;
    unsigned sb = 0;
    for (int r = 0; r < st->nrows; r++) {
        const size_t rs = (oc0 + r) * per;
        const unsigned a = (unsigned)((l0 > rs ? l0 : rs) - rs), b = (unsigned)((l1 < rs + per ? l1 : rs + per) - rs);
        st->a[r] = a, st->b[r] = b;
        st->cclo[r] = a / st->KHW;
        st->W[r] = (b - 1) / st->KHW - st->cclo[r] + 1;
        st->sbase[r] = sb;
        st->mW[r] = adamw_magic(st->W[r]);
        sb += st->W[r] * st->KHW;
    }
    st->sbase[st->nrows] = sb;
    st->mKHW = adamw_magic(st->KHW);
    st->fast = 1;
}

// Elements [0, n) of p, m, v, g; p is floats [base, base + n) of its
// declared buffer, whose working copy `shadow` (of type f16 ? fp16 : bf16;
// NULL when there is none or it is stale) is written in the same pass, the
// nfr registered filters of fr (sorted by offset, device memory) at their
// transposed places.  Each block walks chunks of ADAMW_CHUNK consecutive
// elements (coalesced for the fp32 arrays), and finds the chunk's first
// filter once: a thread then only steps forward through the few filters a
// chunk can cross; inside a filter the copies go through shared memory
// (above) where they can.  (H200, before the staging: 7.8 ms a step over
// SD1.5's 860 M weights, ~3.3 TB/s; float4 loads, four elements a thread,
// changed nothing in call 6 and were taken out.)
// element i of a tensor of gradients: float32, or packed 16-bit bits
__device__ __forceinline__ static float grad_at(const float *g, int prec16, size_t i)
{
    return !prec16                 ? g[i]
           : prec16 == DB_PREC_F16 ? db_cuda_f32(((const __half *)g)[i])
                                   : db_cuda_f32(((const __nv_bfloat16 *)g)[i]);
}

// Packed gradients (db_adamw.g16_runs, DB_ASSIGN_PACK16): nruns tensors
// [runs[2r], runs[2r + 1]) of g (element offsets, sorted) whose values are
// 16-bit bits (prec16) from the start of their slot.
struct adamw_g16 {
    const uint32_t *runs;
    int nruns, prec16;
};
// the first run ending after element e (nruns: none), by a binary search
__device__ static int adamw_run_after(const adamw_g16 &q, size_t e)
{
    int lo = 0, hi = q.nruns;
    while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (q.runs[2 * mid + 1] <= e)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

__global__ static void __launch_bounds__(THREADS, 6) adamw_kernel(float *p, float *m, float *v, const float *g, size_t n, adamw_scalars ks,
                                    void *shadow, size_t base,
                                    const db_cuda_filter_range *fr, int nfr, int f16, const adamw_g16 q)
{
    const db_adamw_coef k = adamw_scalars_now(ks);
    __shared__ int first, run0;
    __shared__ adamw_stage st;
    __shared__ uint16_t stage[ADAMW_CHUNK + 2 * ADAMW_ROWS * ADAMW_KHW];
    for (size_t c0 = (size_t)blockIdx.x * ADAMW_CHUNK; c0 < n; c0 += (size_t)gridDim.x * ADAMW_CHUNK) {
        const size_t c1 = c0 + ADAMW_CHUNK < n ? c0 + ADAMW_CHUNK : n;
        if (nfr && shadow) {
            __syncthreads(); // (the previous chunk's readers of first, st and stage are done)
            if (threadIdx.x == 0) { // the last filter starting at or before the chunk's first element
                int lo = 0, hi = nfr - 1, f = -1;
                while (lo <= hi) {
                    const int mid = (lo + hi) / 2;
                    if (fr[mid].off <= base + c0)
                        f = mid, lo = mid + 1;
                    else
                        hi = mid - 1;
                }
                first = f;
                adamw_stage_plan(&st, f >= 0 ? &fr[f] : NULL, base + c0, base + c1);
                // no filter in [base + c0, base + c1): the one before ends
                // by then, the next starts after
                const bool before = f < 0 || base + c0 >= fr[f].off + (size_t)fr[f].OC * (size_t)fr[f].C * (size_t)fr[f].KHW;
                st.plain = before && (f + 1 >= nfr || fr[f + 1].off >= base + c1);
            }
            __syncthreads();
        }
        if (q.nruns) {
            __syncthreads(); // (the previous chunk's readers of run0 are done)
            if (threadIdx.x == 0)
                run0 = adamw_run_after(q, c0);
            __syncthreads();
        }
        const bool staged = nfr && shadow && st.fast, plain = !nfr || (shadow && st.plain);
        int h = nfr ? first : -1;
        // this thread's run: [rlo, rhi) of run index ri (none past the last)
        int ri = q.nruns ? run0 : 0;
        size_t rlo = ri < q.nruns ? q.runs[2 * ri] : ~(size_t)0, rhi = ri < q.nruns ? q.runs[2 * ri + 1] : 0;
        for (size_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
            float gi;
            if (q.nruns) {
                while (ri < q.nruns && rhi <= i) {
                    ri++;
                    rlo = ri < q.nruns ? q.runs[2 * ri] : ~(size_t)0, rhi = ri < q.nruns ? q.runs[2 * ri + 1] : 0;
                }
                gi = i >= rlo && i < rhi ? grad_at(g + rlo, q.prec16, i - rlo) : g[i];
            } else {
                gi = g[i];
            }
            float mi = m[i], vi = v[i];
            const float pi = adamw_elem(p[i], gi, mi, vi, k);
            p[i] = pi;
            m[i] = mi;
            v[i] = vi;
            if (!shadow)
                continue;
            const unsigned short u = f16 ? __half_as_ushort(__float2half_rn(pi))
                                         : __bfloat16_as_ushort(__float2bfloat16_rn(pi));
            if (staged) { // filter_split by compares and adamw_div: the chunk spans at most ADAMW_ROWS rows
                const unsigned l = (unsigned)(base + i - st.row0);
                const unsigned oc = (l >= st.per) + (l >= 2 * st.per) + (l >= 3 * st.per), rem = l - oc * st.per;
                const unsigned cc = adamw_div(rem, st.mKHW), kk = rem - cc * st.KHW;
                stage[st.sbase[oc] + kk * st.W[oc] + cc - st.cclo[oc]] = u;
            } else if (plain) {
                ((uint16_t *)shadow)[base + i] = u;
            } else {
                const size_t o = base + i;
                while (h + 1 < nfr && fr[h + 1].off <= o)
                    h++;
                ((uint16_t *)shadow)[shadow_place(o, fr, h)] = u;
            }
        }
        if (staged) { // the runs out, in copy order
            __syncthreads();
            for (unsigned s = threadIdx.x; s < st.sbase[st.nrows]; s += blockDim.x) {
                int r = 0;
                while (r + 1 < st.nrows && s >= st.sbase[r + 1])
                    r++;
                const unsigned q = s - st.sbase[r], kk = adamw_div(q, st.mW[r]), cc = st.cclo[r] + q - kk * st.W[r],
                               e = cc * st.KHW + kk;
                if (e >= st.a[r] && e < st.b[r])
                    ((uint16_t *)shadow)[st.row0 + filter_nhwc(r, cc, kk, st.per, st.C)] = stage[s];
            }
        }
    }
}

extern "C" int db_cuda_opt_adamw(db_ctx *c, float *p, float *m, float *v, const float *g, size_t n,
                                 const struct db_adamw *hp, int64_t t)
{
    DB_ENTER(c);
    if (n == 0)
        return 0;
    const adamw_scalars k = adamw_scalars_of(hp, t);
    // Weights with a current 16-bit working copy: write it in the same pass
    // (the copy the next forward's GEMMs read), rather than a second
    // conversion pass over every weight, the convolution filters in it at
    // their channels-last places (conv.cu) rather than rewritten transposed
    // after (call 4: ~1 ms a step).  A stale copy stays stale.
    db_cuda_shadow *w = db_cuda_shadow_find(c, p, n * sizeof(float));
    // A graph replays the choice made here: with a stale copy it would
    // leave the copy unwritten and nothing would mark it stale again (the
    // replay's refresh comes first), and a filter table built now would be
    // copied from the host at the capture.
    if (db_cuda_st(c)->capturing && w && w->s && (!w->valid || (w->nfr && !(w->fr_dev && w->nfr_dev == w->nfr))))
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                            "adamw during a graph capture: the weights' working copy is stale");
    void *sh = w && w->valid && w->s ? w->s : NULL;
    int nfr = 0;
    const db_cuda_filter_range *fr = sh ? db_cuda_shadow_filters(c, w, &nfr) : NULL;
    if (c->err.code)
        return -1;
    const size_t base = w ? (size_t)(p - w->p) : 0;
    const unsigned grid = db_cuda_grid((n + ADAMW_CHUNK - 1) / ADAMW_CHUNK * THREADS, THREADS);
    if (hp->g16_nruns > (size_t)INT_MAX)
        return db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "adamw: %zu packed tensors", hp->g16_nruns);
    const adamw_g16 q{hp->g16_runs, (int)hp->g16_nruns, hp->g16_prec};
    adamw_kernel<<<grid, THREADS, 0, db_cuda_st(c)->stream>>>(p, m, v, g, n, k, sh,
                                                              base, fr, nfr,
                                                              w && w->prec == DB_PREC_F16, q);
    DB_LAUNCHED(c);
    return 0;
}

// ---- sum of squares (db_clip_grad_norm's) ------------------------------------------------

// optim.c's db_sum_squares: fixed 4096-element chunks, each summed in double
// in element order, the chunk partials then added in chunk order.  The
// bits depend on that association, so the kernels keep it exactly: one
// thread per chunk walks its chunk in order (a tree inside the chunk would
// associate differently), and one thread adds the partials in order.
enum { SS_CHUNK = 4096, SS_LANES = 32, SS_TILE = 32 };

// Several tensors in one launch pair: tensor i's chunks go to part[chunk0,
// chunk0 + nchunks), its warps are blocks [block0, block0 + nblocks) of the
// grid.  A table of these lives on the device for the call.
struct ss_tensor {
    const float *g;
    size_t n, chunk0, block0;
    int prec16; // 0: n floats at g; DB_PREC_BF16 / DB_PREC_F16: packed (DB_ASSIGN_PACK16)
};


// part[chunk0 + c] = sum of squares of chunk c of the block's tensor.  A
// block is one warp holding 32 consecutive chunks; it stages SS_TILE
// elements of each of its chunks in shared memory per step (row by row, so
// each global read is one coalesced 128-byte sweep of the warp), then every
// lane adds its own chunk's row in order.  The row is padded by one float
// against bank conflicts.
// the block's tensor in tab (k of them): the last whose first block is at
// or before this one
__device__ static size_t ss_block_tensor(const ss_tensor *tab, size_t k)
{
    size_t lo = 0, hi = k;
    while (hi - lo > 1) {
        const size_t mid = lo + (hi - lo) / 2;
        if (tab[mid].block0 <= blockIdx.x)
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

// (the body of the kernels below: tab in global memory or kernel parameters)
__device__ static void sumsq_chunks(double *part, const ss_tensor *tab, size_t k)
{
    __shared__ float tile[SS_LANES][SS_TILE + 1];
    const size_t lo = ss_block_tensor(tab, k);
    const float *g = tab[lo].g;
    const int p16 = tab[lo].prec16;
    const size_t n = tab[lo].n, nchunks = (n + SS_CHUNK - 1) / SS_CHUNK;
    part += tab[lo].chunk0;
    const int lane = (int)threadIdx.x;
    const size_t first = ((size_t)blockIdx.x - tab[lo].block0) * SS_LANES, mine = first + (size_t)lane;
    double s = 0.0;
    for (int base = 0; base < SS_CHUNK; base += SS_TILE) {
        for (int j = 0; j < SS_LANES; j++) {
            const size_t i = (first + (size_t)j) * SS_CHUNK + (size_t)base + (size_t)lane;
            tile[j][lane] = i < n ? grad_at(g, p16, i) : 0.0f;
        }
        __syncthreads();
        if (mine < nchunks) {
            // only the elements below n: the CPU adds nothing past the end
            const size_t beg = mine * SS_CHUNK + (size_t)base;
            const int cnt = beg >= n ? 0 : n - beg < (size_t)SS_TILE ? (int)(n - beg) : SS_TILE;
            for (int j = 0; j < cnt; j++) {
                const double x = (double)tile[lane][j];
                s = __dadd_rn(s, __dmul_rn(x, x));
            }
        }
        __syncthreads(); // the tile is rewritten next step
    }
    if (mine < nchunks)
        part[mine] = s;
}

__global__ static void __launch_bounds__(SS_LANES) sumsq_chunks_kernel(double *part, const ss_tensor *tab, size_t k)
{
    sumsq_chunks(part, tab, k);
}

// Tensor i's partials added in index order, from 0.0 (the CPU's
// single-chunk shortcut returns part[0] itself: the same bits, as 0.0 + s
// is s for the non-negative or NaN s a sum of squares can be; an empty
// tensor's sum is 0.0, as the CPU's).  A warp per tensor, every lane
// calling with the same i and getting the sum: it reads 32 partials at a
// time (a coalesced load the warp has in flight together), then every
// lane adds them in order from the shuffles.  (H200, fifth call: a thread
// per tensor, walking its partials one load after the other, took 0.63 ms
// a step, SD1.5's largest filter having 3600 of them.)
__device__ static double sumsq_total(const double *part, const ss_tensor *tab, size_t i)
{
    const size_t nchunks = (tab[i].n + SS_CHUNK - 1) / SS_CHUNK;
    const int lane = (int)(threadIdx.x & 31);
    double t = 0.0;
    for (size_t c0 = 0; c0 < nchunks; c0 += 32) {
        const double p = c0 + (size_t)lane < nchunks ? part[tab[i].chunk0 + c0 + (size_t)lane] : 0.0;
        const int cnt = nchunks - c0 < 32 ? (int)(nchunks - c0) : 32;
        for (int j = 0; j < cnt; j++)
            t = __dadd_rn(t, __shfl_sync(0xffffffffu, p, j));
    }
    return t;
}

// a warp per item i of n (each warp's lanes the same i): launch 32 threads an item
#define WARP_STRIDE(i, n)                                                                                              \
    for (size_t i = (blockIdx.x * (size_t)blockDim.x + threadIdx.x) / 32; i < (n);                                     \
         i += (size_t)gridDim.x * blockDim.x / 32)

__global__ static void sumsq_total_kernel(double *out, const double *part, const ss_tensor *tab, size_t k)
{
    WARP_STRIDE(i, k)
    {
        const double t = sumsq_total(part, tab, i);
        if ((threadIdx.x & 31) == 0)
            out[i] = t;
    }
}

// tab[i] for the k tensors g[i] (n[i] floats): where their chunks' partials
// and their blocks begin; *chunks and *blocks the totals
static void ss_layout(ss_tensor *tab, const float *const *g, const size_t *n, const int *prec16, size_t k,
                      size_t *chunks, size_t *blocks)
{
    *chunks = 0, *blocks = 0;
    for (size_t i = 0; i < k; i++) {
        const size_t nc = (n[i] + SS_CHUNK - 1) / SS_CHUNK;
        tab[i] = ss_tensor{g[i], n[i], *chunks, *blocks, prec16 ? prec16[i] : 0};
        *chunks += nc;
        *blocks += (nc + SS_LANES - 1) / SS_LANES;
    }
}

extern "C" int db_cuda_opt_sumsq_many(db_ctx *c, double *out, const float *const *g, const size_t *n,
                                      const int *prec16, size_t k)
{
    DB_ENTER(c);
    if (k == 0)
        return 0;
    db_cuda_state *st = db_cuda_st(c);
    ss_tensor *tab = (ss_tensor *)malloc(k * sizeof *tab);
    if (!tab)
        return db_cuda_fail(c, DB_ENOMEM, __FILE__, __LINE__, "sumsq: out of host memory for %zu tensors", k);
    size_t chunks, blocks;
    ss_layout(tab, g, n, prec16, k, &chunks, &blocks);
    if (blocks > (size_t)INT_MAX) {
        free(tab);
        return db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "sumsq: %zu warps are more than one launch covers",
                            blocks);
    }
    // one device buffer: the table, the partials, the totals
    const size_t tab_bytes = (k * sizeof *tab + 15) & ~(size_t)15;
    char *buf = (char *)db_cuda_alloc(c, tab_bytes + (chunks + k) * sizeof(double));
    if (!buf) {
        free(tab);
        return -1;
    }
    ss_tensor *dtab = (ss_tensor *)buf;
    double *part = (double *)(buf + tab_bytes), *tot = part + chunks;
    cudaError_t e = cudaMemcpyAsync(dtab, tab, k * sizeof *tab, cudaMemcpyHostToDevice, st->stream);
    if (e == cudaSuccess && blocks) {
        sumsq_chunks_kernel<<<(unsigned)blocks, SS_LANES, 0, st->stream>>>(part, dtab, k);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess) {
        sumsq_total_kernel<<<db_cuda_grid(32 * k, THREADS), THREADS, 0, st->stream>>>(tot, part, dtab, k);
        e = cudaGetLastError();
    }
    if (e == cudaSuccess)
        e = cudaMemcpyAsync(out, tot, k * sizeof *out, cudaMemcpyDeviceToHost, st->stream);
    if (e == cudaSuccess)
        e = cudaStreamSynchronize(st->stream); // out and tab are host memory: the caller reads out next
    db_cuda_free(c, buf);
    free(tab);
    if (e != cudaSuccess)
        return db_cuda_fail(c, e == cudaErrorMemoryAllocation ? DB_ENOMEM : DB_EIO, __FILE__, __LINE__, "sumsq: %s",
                            cudaGetErrorString(e));
    return 0;
}

extern "C" int db_cuda_opt_sumsq(db_ctx *c, double *out, const float *g, size_t n)
{
    *out = 0.0;
    return db_cuda_opt_sumsq_many(c, out, &g, &n, NULL, 1);
}

// ---- per-tensor clipping with no wait (db_opt_clip_each) ---------------------------------
//
// The tensors' table goes to the kernels as a parameter, not by a copy: a
// copy from pageable host memory may wait for the stream (CUDA's API
// synchronization notes), which is the wait this op exists to avoid.
// SS_PARAM tensors a launch keep it within the classic 4 KB of parameters;
// more go in several rounds.
enum { SS_PARAM = 96 };
struct ss_params {
    ss_tensor t[SS_PARAM];
};

__global__ static void __launch_bounds__(SS_LANES)
    clip_chunks_kernel(double *part, const __grid_constant__ ss_params p, size_t k)
{
    sumsq_chunks(part, p.t, k);
}

// norms[i] = tensor i's float32 norm and coef[i] its clip coefficient, or
// 1 when it does not scale (optim.c db_clip_one_coef's float steps:
// nk = (float)sqrt(ss), total = (float)sqrt(nk^2) in double, max / (total
// + 1e-6f), scaling below 1 or NaN)
__global__ static void clip_coef_kernel(float *norms, float *coef, const double *part,
                                        const __grid_constant__ ss_params p, size_t k, float max_norm)
{
    WARP_STRIDE(i, k)
    {
        const float nk = __double2float_rn(__dsqrt_rn(sumsq_total(part, p.t, i)));
        const float total = __double2float_rn(__dsqrt_rn(__dmul_rn((double)nk, (double)nk)));
        const float q = __fdiv_rn(max_norm, __fadd_rn(total, 1e-6f));
        if ((threadIdx.x & 31) == 0)
            norms[i] = total, coef[i] = q < 1.0f || isnan(q) ? q : 1.0f;
    }
}

// g *= coef of its tensor (optim.c db_scale's bits), the blocks numbered as
// sumsq_chunks' (a block is SS_LANES chunks of one tensor); the tensors
// that do not scale are left unread.
__global__ static void clip_scale_kernel(const __grid_constant__ ss_params p, const float *coef, size_t k)
{
    const ss_tensor *tab = p.t;
    const size_t lo = ss_block_tensor(tab, k);
    const float q = coef[lo];
    if (q == 1.0f)
        return;
    float *g = (float *)tab[lo].g;
    const size_t n = tab[lo].n, span = (size_t)SS_LANES * SS_CHUNK;
    const size_t beg = ((size_t)blockIdx.x - tab[lo].block0) * span, end = beg + span < n ? beg + span : n;
    for (size_t i = beg + threadIdx.x; i < end; i += blockDim.x)
        g[i] = __fmul_rn(g[i], q);
}

extern "C" int db_cuda_opt_clip_each(db_ctx *c, float *norms, float *const *g, const size_t *n, size_t k,
                                     float max_norm)
{
    DB_ENTER(c);
    cudaStream_t s = db_cuda_st(c)->stream;
    for (size_t r = 0; r < k; r += SS_PARAM) {
        const size_t kr = k - r < (size_t)SS_PARAM ? k - r : (size_t)SS_PARAM;
        ss_params p;
        memset(&p, 0, sizeof p);
        size_t chunks, blocks;
        ss_layout(p.t, (const float *const *)g + r, n + r, NULL, kr, &chunks, &blocks);
        if (blocks > (size_t)INT_MAX)
            return db_cuda_fail(c, DB_EUSAGE, __FILE__, __LINE__, "clip: %zu warps are more than one launch covers",
                                blocks);
        // the partials, then the coefficients (kr floats)
        double *part = (double *)db_cuda_alloc(c, chunks * sizeof(double) + kr * sizeof(float));
        if (!part)
            return -1;
        float *coef = (float *)(part + chunks);
        if (blocks)
            clip_chunks_kernel<<<(unsigned)blocks, SS_LANES, 0, s>>>(part, p, kr);
        clip_coef_kernel<<<db_cuda_grid(32 * kr, THREADS), THREADS, 0, s>>>(norms + r, coef, part, p, kr, max_norm);
        if (blocks)
            clip_scale_kernel<<<(unsigned)blocks, THREADS, 0, s>>>(p, coef, kr);
        const cudaError_t e = cudaGetLastError();
        db_cuda_free(c, part); // stream-ordered: reused only by work queued after
        DB_CU(c, e);
    }
    return 0;
}

// ---- scale ------------------------------------------------------------------------------

// g = g * coef (optim.c's db_scale; a NaN coef poisons every element)
__global__ static void scale_kernel(float *g, float coef, size_t n)
{
    GRID_STRIDE(i, n) g[i] = __fmul_rn(g[i], coef);
}

extern "C" int db_cuda_opt_scale(db_ctx *c, float *g, float coef, size_t n)
{
    DB_ENTER(c);
    if (n == 0)
        return 0;
    scale_kernel<<<db_cuda_grid(n, THREADS), THREADS, 0, db_cuda_st(c)->stream>>>(g, coef, n);
    DB_LAUNCHED(c);
    return 0;
}

// ---- 8-bit AdamW ----------------------------------------------------------------------------

// optim.c's db_adamw8bit_step, bit for bit: one thread block of Q8_THREADS
// threads per quantisation block of DB_Q8_BLOCK elements (one element per
// thread), as bnb's kOptimizerStatic8bit2StateBlockwise runs it.  The code
// books travel by value in the launch (2 KB of the 4 KB parameter space);
// each block copies them to shared memory and derives the decision points
// with the CPU's float operations ((a + b) * 0.5f, _rn), so both sides
// search identical tables with the same function (db_q8_nearest, optim.h).
// The block maxima use fmaxf in a tree: exact, and order-free, so equal to
// the CPU's running fmaxf.
enum { Q8_THREADS = DB_Q8_BLOCK };

struct q8_codes {
    float m[256], v[256];
};

// optim.c's q8_code
__device__ static inline unsigned char q8_code_dev(float x, float absmax, const float *code, const float *mid,
                                                   int signed_fix)
{
    const float r = absmax > 0.0f ? __fdiv_rn(x, absmax) : 0.0f;
    int c = db_q8_nearest(mid, r);
    if (signed_fix && signbit(code[c]) != signbit(x))
        c += x > 0.0f ? 1 : -1;
    return (unsigned char)c;
}

// The code books in shared memory: the codes and the decision points
// between neighbours, with the CPU's float operations.
struct q8_shared {
    float cm[256], cv[256], mm[255], mv[255];
    float red_m[Q8_THREADS], red_v[Q8_THREADS];
};

__device__ static void q8_books(q8_shared &sh, const q8_codes &books)
{
    const int t = (int)threadIdx.x;
    sh.cm[t] = books.m[t];
    sh.cv[t] = books.v[t];
    __syncthreads();
    if (t < 255) {
        sh.mm[t] = __fmul_rn(__fadd_rn(sh.cm[t], sh.cm[t + 1]), 0.5f);
        sh.mv[t] = __fmul_rn(__fadd_rn(sh.cv[t], sh.cv[t + 1]), 0.5f);
    }
    __syncthreads();
}

// Quantisation block b of one tensor (every thread of the block calls it).
// The weights' 16-bit working copy of one tensor, written by the 8-bit
// steps of opt_adamw8bit_many in the same pass (as adamw_kernel writes a
// whole buffer's): s of type f16 ? fp16 : bf16, NULL for none; a filter
// registered channels-last (C input channels, KHW taps, KHW > 1) at its
// transposed places, else element i at s[i].
struct q8_copy {
    void *s;
    unsigned C, KHW;
    int f16;
};
__device__ __forceinline__ static void q8_copy_write(const q8_copy &cp, size_t i, float pi)
{
    const unsigned short u =
        cp.f16 ? __half_as_ushort(__float2half_rn(pi)) : __bfloat16_as_ushort(__float2bfloat16_rn(pi));
    size_t o = i;
    if (cp.KHW > 1) {
        const unsigned per = cp.C * cp.KHW;
        const filter_at a = filter_split((unsigned)i, per, cp.KHW);
        o = filter_nhwc(a.oc, a.cc, a.kk, per, cp.C);
    }
    ((uint16_t *)cp.s)[o] = u;
}

// Quantisation block b of one tensor (every thread of the block calls it);
// cp: the tensor's working copy to write (cp.s NULL: none).
__device__ static void q8_block(q8_shared &sh, float *p, unsigned char *m_q, unsigned char *v_q, float *m_absmax,
                                float *v_absmax, const float *g, int prec16, size_t n, size_t b,
                                const db_adamw_coef &k, const q8_copy &cp)
{
    const int t = (int)threadIdx.x;
    const size_t i = b * DB_Q8_BLOCK + (size_t)t;
    const bool in = i < n;
    float mi = 0.0f, vi = 0.0f;
    if (in) {
        // dequantise with the old scales, then optim.c's adamw_elem
        mi = __fmul_rn(sh.cm[m_q[i]], m_absmax[b]);
        vi = __fmul_rn(sh.cv[v_q[i]], v_absmax[b]);
        const float pi = adamw_elem(p[i], grad_at(g, prec16, i), mi, vi, k);
        p[i] = pi;
        if (cp.s)
            q8_copy_write(cp, i, pi);
    }
    // the block's new scales (threads past n add 0, the CPU's start value)
    sh.red_m[t] = fabsf(mi);
    sh.red_v[t] = fabsf(vi);
    __syncthreads();
    for (int s = Q8_THREADS / 2; s > 0; s >>= 1) {
        if (t < s) {
            sh.red_m[t] = fmaxf(sh.red_m[t], sh.red_m[t + s]);
            sh.red_v[t] = fmaxf(sh.red_v[t], sh.red_v[t + s]);
        }
        __syncthreads();
    }
    const float am = fmaxf(0.0f, sh.red_m[0]), av = fmaxf(0.0f, sh.red_v[0]);
    if (in) {
        m_q[i] = q8_code_dev(mi, am, sh.cm, sh.mm, 1);
        v_q[i] = q8_code_dev(vi, av, sh.cv, sh.mv, 0);
    }
    __syncthreads(); // every thread has read the old scales and red_*[0] before they change
    if (t == 0) {
        m_absmax[b] = am;
        v_absmax[b] = av;
    }
}

__global__ static void __launch_bounds__(Q8_THREADS)
    adamw8bit_kernel(float *p, unsigned char *m_q, unsigned char *v_q, float *m_absmax, float *v_absmax,
                     const float *g, size_t n, size_t nblocks, adamw_scalars ks, q8_codes books)
{
    const db_adamw_coef k = adamw_scalars_now(ks);
    __shared__ q8_shared sh;
    q8_books(sh, books);
    const q8_copy none = {NULL, 0, 0, 0};
    for (size_t b = blockIdx.x; b < nblocks; b += gridDim.x)
        q8_block(sh, p, m_q, v_q, m_absmax, v_absmax, g, 0, n, b, k, none);
}

// opt_adamw8bit_many: the jobs of a launch, each with the index of its
// first block of DB_Q8_BLOCK elements in the launch (ascending).  They go
// as a kernel parameter, Q8_PARAM_JOBS a launch (with the 2 KB code books,
// within the classic 4 KB of parameters), not by a copy: a copy from
// pageable memory may wait for the stream, and the fused backward calls
// this once a unit.  Each job carries its tensor's working copy (112
// bytes a job: 16 jobs, the books and the scalars make 3.9 KB).
struct q8_dev_job {
    float *p;
    const float *g;
    size_t n, first;
    unsigned char *m_q, *v_q;
    float *m_absmax, *v_absmax, *m32, *v32;
    q8_copy cp;
    int q8, prec16; // (prec16: the gradient packed, DB_ASSIGN_PACK16; in q8's padding, the size stays 112)
};
static_assert(sizeof(q8_dev_job) == 112, "Q8_PARAM_JOBS jobs a launch within 4 KB of parameters");
enum { Q8_PARAM_JOBS = 16 };
struct q8_jobs {
    q8_dev_job j[Q8_PARAM_JOBS];
};

__global__ static void __launch_bounds__(Q8_THREADS)
    adamw8bit_many_kernel(const __grid_constant__ q8_jobs table, size_t njobs, size_t total, adamw_scalars ks,
                          q8_codes books)
{
    const db_adamw_coef k = adamw_scalars_now(ks);
    const q8_dev_job *jobs = table.j;
    __shared__ q8_shared sh;
    q8_books(sh, books);
    for (size_t gb = blockIdx.x; gb < total; gb += gridDim.x) {
        size_t lo = 0, hi = njobs; // the last job whose first block is <= gb (every job has blocks)
        while (hi - lo > 1) {
            const size_t mid = (lo + hi) / 2;
            if (jobs[mid].first <= gb)
                lo = mid;
            else
                hi = mid;
        }
        const q8_dev_job &j = jobs[lo];
        const size_t b = gb - j.first;
        if (j.q8) {
            q8_block(sh, j.p, j.m_q, j.v_q, j.m_absmax, j.v_absmax, j.g, j.prec16, j.n, b, k, j.cp);
            continue;
        }
        const size_t i = b * DB_Q8_BLOCK + threadIdx.x; // fp32 moments
        if (i < j.n) {
            float mi = j.m32[i], vi = j.v32[i];
            const float pi = adamw_elem(j.p[i], grad_at(j.g, j.prec16, i), mi, vi, k);
            j.p[i] = pi;
            j.m32[i] = mi;
            j.v32[i] = vi;
            if (j.cp.s)
                q8_copy_write(j.cp, i, pi);
        }
    }
}

static q8_codes q8_books_of(const struct db_q8_maps *maps)
{
    q8_codes books;
    for (int j = 0; j < 256; j++) {
        books.m[j] = maps->m.code[j];
        books.v[j] = maps->v.code[j];
    }
    return books;
}

// The working copy job j's step writes: its tensor's place in a current
// copy, plain or a registered filter it is exactly; otherwise (no copy,
// a stale one, a filter the tensor only overlaps) none, and a copy the
// step changes under goes stale (rebuilt whole at its next use: the fused
// backward steps ~50 units a step, so a rebuild after each was ~50 passes
// over every weight).
static q8_copy q8_copy_of(db_ctx *c, const db_q8_job *j, int *stale)
{
    q8_copy cp = {NULL, 0, 0, 0};
    const size_t bytes = j->n * sizeof(float);
    db_cuda_shadow *w = db_cuda_shadow_find(c, j->p, bytes);
    if (!w || !w->s || !w->valid) {
        *stale = w != NULL;
        db_cuda_shadow_touch(c, j->p, bytes);
        return cp;
    }
    const size_t off = (size_t)(j->p - w->p);
    for (int i = 0; i < w->nfr; i++) {
        const db_cuda_filter_range *f = &w->fr[i];
        const size_t fn = (size_t)f->OC * f->C * f->KHW;
        if (f->off >= off + j->n || off >= f->off + fn)
            continue;
        if (f->off != off || fn != j->n || cp.KHW) { // a part of a filter, or more than one
            *stale = 1;
            db_cuda_shadow_touch(c, j->p, bytes);
            return q8_copy{NULL, 0, 0, 0};
        }
        cp.C = (unsigned)f->C, cp.KHW = (unsigned)f->KHW;
    }
    cp.s = (char *)w->s + off * 2;
    cp.f16 = w->prec == DB_PREC_F16;
    return cp;
}

extern "C" int db_cuda_opt_adamw8bit_many(db_ctx *c, const db_q8_job *jobs, size_t njobs, const struct db_adamw *hp,
                                          int64_t t, const struct db_q8_maps *maps)
{
    DB_ENTER(c);
    db_cuda_state *st = db_cuda_st(c);
    const adamw_scalars coef = adamw_scalars_of(hp, t);
    const q8_codes books = q8_books_of(maps);
    size_t i = 0;
    while (i < njobs) {
        q8_jobs table;
        memset(&table, 0, sizeof table);
        size_t k = 0, total = 0;
        for (; i < njobs && k < Q8_PARAM_JOBS; i++) {
            const db_q8_job *j = &jobs[i];
            if (j->n == 0)
                continue;
            int stale = 0;
            table.j[k++] = q8_dev_job{j->p,        j->g,        j->n,   total,     j->m_q,               j->v_q,
                                      j->m_absmax, j->v_absmax, j->m32, j->v32,    q8_copy_of(c, j, &stale), j->q8,
                                      j->prec16};
            if (stale && st->capturing) // marked stale on the host here: a replay would not
                return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__,
                                    "adamw8bit_many during a graph capture: the weights' working copy is stale");
            total += (j->n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
        }
        if (k == 0)
            continue;
        const unsigned grid = db_cuda_grid(total, 1); // one block per quantisation block, capped
        adamw8bit_many_kernel<<<grid, Q8_THREADS, 0, st->stream>>>(table, k, total, coef, books);
        const cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess)
            return db_cuda_fail(c, DB_EIO, __FILE__, __LINE__, "adamw8bit_many: %s", cudaGetErrorString(e));
    }
    return 0;
}

extern "C" int db_cuda_opt_adamw8bit(db_ctx *c, float *p, uint8_t *m_q, uint8_t *v_q, float *m_absmax,
                                     float *v_absmax, const float *g, size_t n, const struct db_adamw *hp,
                                     int64_t t, const struct db_q8_maps *maps)
{
    DB_ENTER(c);
    if (n == 0)
        return 0;
    const adamw_scalars k = adamw_scalars_of(hp, t);
    const q8_codes books = q8_books_of(maps);
    const size_t nblocks = (n + DB_Q8_BLOCK - 1) / DB_Q8_BLOCK;
    const unsigned grid = db_cuda_grid(nblocks, 1);
    // not fused with the weights' 16-bit working copy (as opt_adamw and
    // opt_adamw8bit_many are): the copy goes stale and the next 16-bit op
    // rebuilds it (marked here, on the host: a graph replay would not)
    if (db_cuda_st(c)->capturing && db_cuda_shadow_find(c, p, n * sizeof(float)))
        return db_cuda_fail(c, DB_EUNSUPP, __FILE__, __LINE__, "adamw8bit of declared weights during a graph capture");
    db_cuda_shadow_touch(c, p, n * sizeof(float));
    adamw8bit_kernel<<<grid, Q8_THREADS, 0, db_cuda_st(c)->stream>>>(p, m_q, v_q, m_absmax, v_absmax, g, n,
                                                                     nblocks, k, books);
    DB_LAUNCHED(c);
    return 0;
}
