// Group norm (+ fused SiLU), layer norm and softmax, forward and backward:
// the twins of kernels/cpu/norm.c and norm_backward.c, with their math:
// two-pass statistics accumulated in double (mean, then the mean of squared
// deviations from the float mean; group norm gets the second from each
// piece's deviations about its own mean, gn_group_stats), rstd =
// (float)(1 / sqrt(var + eps)) in double, softmax sums in double.  A block
// per row (softmax), a warp per row (layer norm) or a block per piece of a
// channel (group norm: gn_pieces, so that it fills the GPU at any batch
// size); the reductions
// (reduce.h) have a fixed order, and partial sums are combined in index
// order, so every result is deterministic.
#include "kernels/cuda/cuda.h"
#include "kernels/cuda/cluster.h"
#include "kernels/cuda/cp_async.h"
#include "kernels/cuda/reduce.h"

#include <string.h>

enum { ROW_THREADS = 256, LN_ROWS = 8 };

// dst (C) += (float) sum_r part[r, :], r in order; r16 1 / 2: dst +=
// round((float) sum) to bf16 / fp16 (the sum first added to a float32 zero,
// as when it was summed into a zeroed scratch and that rounded and added:
// a -0 sum adds +0).  One thread per column.
__global__ static void finish_colsum_kernel(db_colsum_job jb)
{
    const int j0 = blockIdx.x * blockDim.x;
    db_cuda_colsum_finish(jb, j0, j0 + (int)blockDim.x < jb.C ? j0 + (int)blockDim.x : jb.C);
}

int db_cuda_colsum_done(db_ctx *c, const unsigned *tickets, db_colsum_job jb)
{
    if (tickets || !jb.dst || jb.C == 0)
        return 0;
    finish_colsum_kernel<<<(jb.C + 127) / 128, 128, 0, db_cuda_st(c)->stream>>>(jb);
    DB_LAUNCHED(c);
    return 0;
}

unsigned *db_cuda_tickets(db_ctx *c)
{
    db_cuda_state *st = db_cuda_st(c);
    if (st->tickets || st->capturing)
        return st->tickets;
    const char *off = getenv("DB_COLSUM_TICKETS"); // "0": none, the second stages launched apart (a test's)
    if (off && !strcmp(off, "0"))
        return NULL;
    unsigned *t = NULL;
    if (cudaMalloc(&t, DB_CUDA_TICKETS * sizeof *t) != cudaSuccess ||
        cudaMemsetAsync(t, 0, DB_CUDA_TICKETS * sizeof *t, st->stream) != cudaSuccess) {
        (void)cudaGetLastError();
        if (t)
            cudaFree(t);
        return NULL;
    }
    return st->tickets = t;
}

// ---- forward ------------------------------------------------------------------------

// Group norm in pieces, so that every group norm fills the GPU: a piece is
// one sample's one channel, or a part of it, [k L, min(HW, (k + 1) L)); P =
// B C K pieces, a block each, K from the shape alone (gn_pieces), so the
// results are the same on any card.  Each statistic is summed per piece in
// double, then over the group's pieces in index order by one thread of
// every block that needs it.  A whole group per block gave B * 32 blocks:
// 64 at the UNet's batch of 2, 32 at the VAE's 512x512 levels (4 MB each),
// a quarter to a half of an H100's 132 multiprocessors.
enum { GN_THREADS = 256, GN_TARGET = 1024, GN_MIN_PIECE = 1024 };

struct gn_split {
    int K, L;
};

static gn_split gn_pieces(int B, int C, int HW)
{
    const long bc = (long)B * C;
    long K = (GN_TARGET + bc - 1) / bc;
    const long kmax = HW / GN_MIN_PIECE > 1 ? HW / GN_MIN_PIECE : 1;
    K = K < 1 ? 1 : K > kmax ? kmax : K;
    int L = (int)((HW + K - 1) / K);
    L = (L + 3) & ~3; // pieces start 16-byte aligned when HW is a multiple of 4
    return gn_split{(HW + L - 1) / L, L};
}

// The pieces of a (B, C, HW) group norm, *P of them, and scratch for two
// doubles per piece (db_cuda_free it); NULL with c->err set.
static double *gn_scratch(db_ctx *c, int B, int C, int HW, gn_split *sp, int *P)
{
    *sp = gn_pieces(B, C, HW);
    *P = B * C * sp->K;
    return (double *)db_cuda_alloc(c, sizeof(double) * 2 * (size_t)*P);
}

// The group (b, g)'s per-piece statistics: cg K values from here.
__device__ __forceinline__ static const double *gn_group(const double *part, int b, int g, int C, int cg, int K)
{
    return part + ((size_t)b * C + (size_t)g * cg) * K;
}

// Where one thread of a block sums a group's per-piece values in order
// (the bits the CPU has), it first has the whole block load them into
// shared memory, in parallel: the H200 profile had those serial loads from
// global memory (one L2 round trip each, before the block's barrier) make
// the group norm kernels 2-3 times slower than their memory traffic.  n
// values of q into buf (room for cap) and buf returned, or q itself when
// they do not fit (the thread then reads them there: the same values in
// the same order, so the same bits).  Every thread of the block calls it.
__device__ static const double *gn_stage(double *buf, int cap, const double *q, int n)
{
    if (n > cap)
        return q;
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        buf[j] = q[j];
    __syncthreads();
    return buf;
}

// the sum of v[0, n) in index order
__device__ __forceinline__ static double gn_sum(const double *v, int n)
{
    double s = 0;
    for (int j = 0; j < n; j++)
        s += v[j];
    return s;
}

// One squared deviation added, y = x a + shft and its SiLU: written once,
// for both the pieces' kernels and the whole-group one (groupnorm_whole_kernel),
// so that nvcc contracts them alike and the two paths give the same bits.
__device__ __forceinline__ static double gn_dev2(double q, float x, double m)
{
    const double d = (double)x - m;
    return q + d * d;
}
__device__ __forceinline__ static void gn_coefs(float rs, float mu, float w, float b, float *a, float *shft)
{
    // y = (x - mu) * rs * w + b = x * a + (b - mu * a), as norm.c
    *a = rs * w;
    *shft = b - mu * *a;
}
__device__ __forceinline__ static float gn_out(float x, float a, float shft, int silu)
{
    const float t = x * a + shft;
    return silu ? t / (1.0f + expf(-t)) : t;
}

// grid P, block GN_THREADS.  part1 (P) = per piece sum(x); part2 (P) = per
// piece sum((x - m)^2) about the piece's own mean m = sum / count.  One
// kernel, the piece read twice (the second time from the cache), where a
// kernel for the sums and one for the deviations from the group's mean
// each read the input whole.
__global__ static void groupnorm_stats_kernel(double *part1, double *part2, const float *inp, int HW, int K, int L)
{
    __shared__ double sh[32];
    const int p = blockIdx.x, k = p % K, i0 = k * L, i1 = min(HW, (k + 1) * L);
    const float *x = inp + (size_t)(p / K) * HW;
    double s = 0;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x)
        s += x[i];
    s = db_block_sum(s, sh);
    const double m = s / (double)(i1 - i0);
    double q = 0;
    for (int i = i0 + threadIdx.x; i < i1; i += blockDim.x)
        q = gn_dev2(q, x[i], m);
    q = db_block_sum(q, sh);
    if (threadIdx.x == 0)
        part1[p] = s, part2[p] = q;
}

// piece j's length (its channel's stretch [k L, min(HW, (k + 1) L)), k = j % K)
__device__ __forceinline__ static int gn_piece_len(int j, int HW, int K, int L)
{
    const int k = j % K;
    return min(HW, (k + 1) * L) - k * L;
}
// What a piece of len values with sum s and squared deviations q about its
// own mean adds to the group's squared deviations from the group's float
// mean m: q + len (s / len - m)^2, its sum((x - m)^2) exactly (norm.c's
// second pass) up to rounding in double.  One function for every kernel
// that forms it (so nvcc contracts it alike everywhere: the same bits).
__device__ __forceinline__ static double gn_piece_term(double s, double q, int len, float m)
{
    const double d = s / (double)len - (double)m;
    return q + (double)len * d * d;
}
// the group's rstd from its squared deviations m2 over n values
__device__ __forceinline__ static float gn_rstd(double m2, double n, float eps)
{
    return (float)(1.0 / sqrt(m2 / n + (double)eps));
}

// The group's mean (float, as norm.c has it) and its sum of squared
// deviations from that float mean, from the per-piece sums s (cg K of
// them) and deviations q about each piece's own mean, in piece order.
__device__ static void gn_group_stats(const double *s, const double *q, int np, int HW, int K, int L, double n,
                                      float *mu, double *m2)
{
    const float m = (float)(gn_sum(s, np) / n);
    double acc = 0;
    for (int j = 0; j < np; j++)
        acc += gn_piece_term(s[j], q[j], gn_piece_len(j, HW, K, L), m);
    *mu = m, *m2 = acc;
}

// grid P, block GN_THREADS.  out (may equal inp: each element read, then
// written, by one thread), mean and rstd (B, G) or NULL: the group's first
// piece writes them.
__global__ static void groupnorm_apply_kernel(float *out, float *mean, float *rstd, const double *part1,
                                              const double *part2, const float *inp, const float *weight,
                                              const float *bias, int C, int HW, int G, int K, int L, float eps, int silu)
{
    __shared__ double st[2 * GN_THREADS];
    __shared__ float smu, srs;
    const int p = blockIdx.x, k = p % K, bc = p / K, b = bc / C, c = bc % C, cg = C / G, g = c / cg;
    const double *v1 = gn_stage(st, GN_THREADS, gn_group(part1, b, g, C, cg, K), cg * K);
    const double *v2 = gn_stage(st + GN_THREADS, GN_THREADS, gn_group(part2, b, g, C, cg, K), cg * K);
    if (threadIdx.x == 0) {
        const double n = (double)cg * HW;
        float mu;
        double m2;
        gn_group_stats(v1, v2, cg * K, HW, K, L, n, &mu, &m2);
        const float rs = gn_rstd(m2, n, eps);
        smu = mu, srs = rs;
        if (k == 0 && c == g * cg) {
            if (mean)
                mean[b * G + g] = mu;
            if (rstd)
                rstd[b * G + g] = rs;
        }
    }
    __syncthreads();
    float a, shft;
    gn_coefs(srs, smu, weight[c], bias[c], &a, &shft);
    const float *x = inp + (size_t)bc * HW;
    float *y = out + (size_t)bc * HW;
    const int i1 = min(HW, (k + 1) * L);
    for (int i = k * L + threadIdx.x; i < i1; i += blockDim.x)
        y[i] = gn_out(x[i], a, shft, silu);
}

// ---- a whole group in shared memory: one block, or a cluster of blocks ----
//
// Where a group (cg HW floats: contiguous in NCHW) fits in shared memory,
// one launch does it all: the group is read from global memory once,
// its pieces summed there, and the output written.  The pieces
// (gn_pieces), their per-piece sums and their combination are those of the
// two kernels above, to the bit: a warp sums a piece at a time as the
// stats kernel's GN_THREADS threads do, each lane standing for GN_WARPS of
// them (their strides, their order), and reduces as db_block_sum does
// (db_warp_part_sum); the group's statistics come from the same per-piece
// terms added in the same order (gn_sum, gn_piece_term), and gn_coefs /
// gn_out give the same output.  So which path runs changes speed only;
// DB_GN_WHOLE=0 in the environment keeps the pieces' kernels (to compare).
//
// A group is split over a cluster of cl blocks (cluster.h) when one block
// a group would leave most of the card idle: B G = 64 blocks of 1024
// threads at the UNet's batch of 2, on 132 multiprocessors (H200, sixth
// call: 19.5 us a launch forward, 32.3 backward, ~4x the memory traffic's
// time).  Block r of a cluster takes pieces [np r / cl, np (r + 1) / cl)
// (a contiguous stretch of the group), sums them into its shared memory,
// and after a cluster barrier every block reads all np sums from their
// owners' shared memory in piece order, so every block combines the same
// values the same way.  gw_choose picks the smallest cl (1, 2 or 4) whose
// stretch fits in shared memory, grown while B G cl blocks would leave
// more than half the multiprocessors without one; DB_GN_CLUSTER=N forces
// N (1: no cluster).  H200, calls 7-8: 13.3 us a launch forward and 22.5
// backward in clusters of two at SD1.5's B2 (0.017 / 0.027 ms at C320
// 64x64 against 0.023 / 0.032 one block a group); clusters of four were
// slower (0.037 / 0.060).
// H200 (2026-11-27, fifth call): with four 256-thread sub-blocks summing a
// piece each between block-wide barriers and the group read by plain
// loads, 27 us a launch at SD1.5's 64x64 level (B2 C320), no faster than
// the pieces; the warps sum without barriers since, and the group comes
// in by cp.async (every copy in flight at once).
enum { GW_THREADS = 4 * GN_THREADS, GW_WARPS = GW_THREADS / 32, GN_WARPS = GN_THREADS / 32, GW_MAX_CLUSTER = 4 };

// piece j's first element, in floats from its group's start (channel
// j / K, from (j % K) L); j = np gives the group's size
__host__ __device__ __forceinline__ static int gw_piece_start(int j, int HW, int K, int L)
{
    return (j / K) * HW + (j % K) * L;
}
// the first of np pieces that block r of a cluster of cl takes
__host__ __device__ __forceinline__ static int gw_share(int np, int r, int cl) { return (int)((long)np * r / cl); }
// the rank of the block that holds piece j
__device__ __forceinline__ static int gw_owner(int j, int np, int cl)
{
    int o = 0;
    while (j >= gw_share(np, o + 1, cl))
        o++;
    return o;
}

// What a block of a whole-group kernel takes (grid B G cl, block r of each
// cluster of cl): group bg (g of G in sample b), its n = cg HW floats in
// np = cg K pieces, of them pieces [j0, j1), floats [e0, e0 + ne) of the
// group
struct gw_stretch {
    int r, bg, b, g, cg, n, np, j0, j1, e0, ne;
};
__device__ __forceinline__ static gw_stretch gw_stretch_of(int C, int HW, int G, int K, int L, int cl)
{
    gw_stretch s;
    s.r = cl > 1 ? (int)db_cl::rank() : 0, s.bg = blockIdx.x / cl, s.b = s.bg / G, s.g = s.bg % G, s.cg = C / G;
    s.n = s.cg * HW, s.np = s.cg * K;
    s.j0 = gw_share(s.np, s.r, cl), s.j1 = gw_share(s.np, s.r + 1, cl), s.e0 = gw_piece_start(s.j0, HW, K, L);
    s.ne = gw_piece_start(s.j1, HW, K, L) - s.e0;
    return s;
}

// The stats kernel's per-thread sums of one piece, for its GN_THREADS
// threads t = 32 w + lane: v[w] = sum over i = i0 + t, i0 + t + GN_THREADS,
// ... below i1 of x[i] (dev 0) or of (x[i] - m)^2 (dev 1), in that order.
__device__ __forceinline__ static void gw_piece_sums(double (&v)[GN_WARPS], const float *x, int i0, int i1, int dev,
                                                     double m)
{
    const int lane = (int)(threadIdx.x & 31);
#pragma unroll
    for (int w = 0; w < GN_WARPS; w++)
        v[w] = 0;
    for (int base = i0; base < i1; base += GN_THREADS) {
#pragma unroll
        for (int w = 0; w < GN_WARPS; w++) {
            const int i = base + 32 * w + lane;
            if (i < i1)
                v[w] = dev ? gn_dev2(v[w], x[i], m) : v[w] + x[i];
        }
    }
}

// After each block of a cluster has written the sums of its own pieces at
// their index in a (and b), every block's copy of all np of them in ga
// (gb), read from their owners' shared memory; a, b themselves when cl is
// 1.  The cluster's blocks arrive at its barrier once they have read (the
// kernel waits there before it exits).  The caller __syncthreads() before
// reading the result.
__device__ static void gw_gather(const double **va, const double **vb, double *a, double *b, double *ga, double *gb,
                                 int np, int cl)
{
    *va = a, *vb = b;
    if (cl == 1)
        return;
    db_cl::sync();
    for (int j = threadIdx.x; j < np; j += GW_THREADS) {
        const unsigned o = (unsigned)gw_owner(j, np, cl);
        ga[j] = *db_cl::map(a + j, o);
        gb[j] = *db_cl::map(b + j, o);
    }
    db_cl::arrive();
    *va = ga, *vb = gb;
}

// grid B G cl (in clusters of cl when cl > 1), block GW_THREADS, dynamic
// shared memory gw_smem(xcap, cg K, 1), xcap the largest stretch (gw_xcap).
// out (may equal inp), mean and rstd (B, G) or NULL, as the kernels above.
__global__ static void __launch_bounds__(GW_THREADS)
    groupnorm_whole_kernel(float *out, float *mean, float *rstd, const float *inp, const float *weight,
                           const float *bias, int C, int HW, int G, int K, int L, float eps, int silu, int cl, int xcap)
{
    extern __shared__ __align__(16) float smem[]; // float4 and cp.async's 16 bytes
    const gw_stretch t = gw_stretch_of(C, HW, G, K, L, cl);
    const int r = t.r, bg = t.bg, g = t.g, cg = t.cg, n = t.n, np = t.np, j0 = t.j0, j1 = t.j1, e0 = t.e0, ne = t.ne;
    float *xs = smem; // this block's stretch [e0, e0 + ne) of the group
    double *ps = (double *)(smem + xcap), *pq = ps + np, *gs = pq + np, *gq = gs + np, *tm = gq + np;
    float *sc = (float *)(tm + np); // the group's mean and rstd
    const float *x = inp + (size_t)bg * n + e0;
    float *y = out + (size_t)bg * n + e0;
    const int vec = ne % 4 == 0 && ((uintptr_t)x & 15) == 0 && ((uintptr_t)y & 15) == 0;
    if (vec) {
        for (int i = threadIdx.x; i < ne / 4; i += GW_THREADS)
            db_cp::copy16((float4 *)xs + i, (const float4 *)x + i, 16);
        db_cp::commit();
        db_cp::wait<0>();
    } else {
        for (int i = threadIdx.x; i < ne; i += GW_THREADS)
            xs[i] = x[i];
    }
    __syncthreads();
    // warp `wi` takes this block's pieces j0 + wi, j0 + wi + GW_WARPS, ...
    const int wi = (int)(threadIdx.x / 32);
    for (int j = j0 + wi; j < j1; j += GW_WARPS) {
        const float *xc = xs + (gw_piece_start(j, HW, K, L) - e0);
        const int len = gn_piece_len(j, HW, K, L);
        double v[GN_WARPS];
        gw_piece_sums(v, xc, 0, len, 0, 0.0);
        const double s = db_warp_part_sum(v), m = s / (double)len;
        gw_piece_sums(v, xc, 0, len, 1, m);
        const double q = db_warp_part_sum(v);
        if ((threadIdx.x & 31) == 0)
            ps[j] = s, pq[j] = q;
    }
    const double *vs, *vq;
    gw_gather(&vs, &vq, ps, pq, gs, gq, np, cl);
    __syncthreads();
    // gn_group_stats, its per-piece terms (a division each) in parallel
    const double nn = (double)n;
    if (threadIdx.x == 0)
        sc[0] = (float)(gn_sum(vs, np) / nn);
    __syncthreads();
    const float mu = sc[0];
    for (int j = threadIdx.x; j < np; j += GW_THREADS)
        tm[j] = gn_piece_term(vs[j], vq[j], gn_piece_len(j, HW, K, L), mu);
    __syncthreads();
    if (threadIdx.x == 0) {
        const float rs = gn_rstd(gn_sum(tm, np), nn, eps);
        sc[1] = rs;
        if (r == 0 && mean)
            mean[bg] = mu;
        if (r == 0 && rstd)
            rstd[bg] = rs;
    }
    __syncthreads();
    const float rs = sc[1];
    if (vec) {
        // (the four may straddle two channels: each finds its own, unless
        // HW and the stretch's start are multiples of 4, SD's every case,
        // when they share one: its coefficients once, not four times)
        const bool same4 = HW % 4 == 0 && e0 % 4 == 0;
        for (int i = threadIdx.x; i < ne / 4; i += GW_THREADS) {
            const float4 v = ((const float4 *)xs)[i];
            float e[4] = {v.x, v.y, v.z, v.w};
            if (same4) {
                const int c = g * cg + (e0 + 4 * i) / HW;
                float a, shft;
                gn_coefs(rs, mu, weight[c], bias[c], &a, &shft);
                for (int q = 0; q < 4; q++)
                    e[q] = gn_out(e[q], a, shft, silu);
            } else {
                for (int q = 0; q < 4; q++) {
                    const int c = g * cg + (e0 + 4 * i + q) / HW;
                    float a, shft;
                    gn_coefs(rs, mu, weight[c], bias[c], &a, &shft);
                    e[q] = gn_out(e[q], a, shft, silu);
                }
            }
            ((float4 *)y)[i] = make_float4(e[0], e[1], e[2], e[3]);
        }
    } else {
        for (int i = threadIdx.x; i < ne; i += GW_THREADS) {
            const int c = g * cg + (e0 + i) / HW;
            float a, shft;
            gn_coefs(rs, mu, weight[c], bias[c], &a, &shft);
            y[i] = gn_out(xs[i], a, shft, silu);
        }
    }
    if (cl > 1)
        db_cl::wait(); // the others may still be reading ps, pq
}

// the dynamic shared memory of a whole-group kernel: nbuf stretches of
// xcap floats (the forward's x; the backward's x and dout) and 5 np + 1
// doubles (the per-piece sums, their gathered copies, the terms, the
// group's two floats)
static size_t gw_smem(int xcap, int np, int nbuf)
{
    return (size_t)nbuf * xcap * sizeof(float) + (5 * (size_t)np + 1) * sizeof(double);
}

// the longest stretch of a group's np = cg K pieces that a block of a
// cluster of cl takes, rounded up to even (so the doubles after it align)
static int gw_xcap(int cg, int HW, int K, int L, int cl)
{
    const int np = cg * K;
    int most = 0;
    for (int r = 0; r < cl; r++) {
        const int j0 = gw_share(np, r, cl), j1 = gw_share(np, r + 1, cl);
        const int len = gw_piece_start(j1, HW, K, L) - gw_piece_start(j0, HW, K, L);
        most = len > most ? len : most;
    }
    return (most + 1) & ~1;
}

struct gw_plan {
    int cl;      // blocks a group (a cluster when > 1); 0: the pieces' kernels run
    int xcap;    // gw_xcap
    size_t smem; // dynamic shared memory a block
};

// How a (B, C, HW) group norm in G groups of K pieces of L a channel runs
// with a whole-group kernel: the smallest cluster of 1, 2 or 4 blocks a
// group whose stretch fits in the card's shared memory, growing while the
// launch would still leave half the multiprocessors without a block;
// DB_GN_CLUSTER=N only N; DB_GN_WHOLE=0 none (the pieces).  Each block has
// at least one piece.  kern's shared memory limit is raised as it goes.
template <typename Kern>
static gw_plan gw_choose(db_ctx *c, Kern kern, int nbuf, int B, int C, int HW, int G, int K, int L)
{
    gw_plan p = {0, 0, 0};
    const char *whole = getenv("DB_GN_WHOLE"), *force = getenv("DB_GN_CLUSTER");
    if (whole && strcmp(whole, "0") == 0)
        return p;
    // the ctx's plans (not with DB_GN_CLUSTER set: the tests change it)
    db_cuda_state *st = db_cuda_st(c);
    const int key[6] = {nbuf - 1, B, C, HW, G, 1};
    if (!force)
        for (int i = 0; i < st->ngn_plan && i < DB_CUDA_NGN_PLAN; i++)
            if (memcmp(st->gn_plan[i].key, key, sizeof key) == 0)
                return gw_plan{st->gn_plan[i].cl, st->gn_plan[i].xcap, st->gn_plan[i].smem};
    const int cg = C / G, np = cg * K, want = force ? atoi(force) : 0;
    for (int cl = 1; cl <= GW_MAX_CLUSTER && cl <= np; cl *= 2) {
        if (want > 0 && cl != want)
            continue;
        const int xcap = gw_xcap(cg, HW, K, L, cl);
        const size_t smem = gw_smem(xcap, np, nbuf);
        if (smem + 1024 > (size_t)st->smem_optin)
            continue;
        // (the occupancy query below needs the limit raised; the launch sets
        // it again, since a later plan, of this shape or another, may have
        // lowered it: the attribute is the kernel's, not the plan's)
        if (smem > 48 * 1024 &&
            cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess) {
            (void)cudaGetLastError();
            continue;
        }
        if (!db_cl::fits(kern, GW_THREADS, smem, cl))
            continue;
        p = gw_plan{cl, xcap, smem};
        if (want > 0 || 2L * B * G * cl > st->nsm)
            break;
    }
    if (!force) {
        db_cuda_gn_plan *e = &st->gn_plan[st->ngn_plan++ % DB_CUDA_NGN_PLAN];
        memcpy(e->key, key, sizeof key);
        e->cl = p.cl, e->xcap = p.xcap, e->smem = p.smem;
    }
    return p;
}

extern "C" int db_cuda_groupnorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp,
                                         const float *weight, const float *bias, int B, int C, int HW, int G, float eps,
                                         int silu)
{
    DB_ENTER(c);
    if (B * G == 0 || HW == 0)
        return 0;
    cudaStream_t st = db_cuda_st(c)->stream;
    const gn_split ws = gn_pieces(B, C, HW);
    const gw_plan wp = gw_choose(c, groupnorm_whole_kernel, 1, B, C, HW, G, ws.K, ws.L);
    if (wp.cl) {
        if (db_cuda_smem_optin(c, groupnorm_whole_kernel, wp.smem))
            return -1;
        DB_CU(c, db_cl::launch(groupnorm_whole_kernel, B * G * wp.cl, GW_THREADS, wp.smem, st, wp.cl, out, mean, rstd,
                               inp, weight, bias, C, HW, G, ws.K, ws.L, eps, silu, wp.cl, wp.xcap));
        return 0;
    }
    gn_split sp;
    int P;
    double *part = gn_scratch(c, B, C, HW, &sp, &P);
    if (!part)
        return -1;
    groupnorm_stats_kernel<<<P, GN_THREADS, 0, st>>>(part, part + P, inp, HW, sp.K, sp.L);
    groupnorm_apply_kernel<<<P, GN_THREADS, 0, st>>>(out, mean, rstd, part, part + P, inp, weight, bias, C, HW, G,
                                                     sp.K, sp.L, eps, silu);
    const cudaError_t e = cudaGetLastError();
    db_cuda_free(c, part);
    DB_CU(c, e);
    return 0;
}

// Layer norm: RW warps per row (LN_ROWS / RW rows per block), warp
// shuffles for the sums, and with RW > 1 the row's warps' partials added
// through shared memory: rows are short (320..1280 in SD, 768 in CLIP), and
// a block of 256 threads per row spent its time in barriers with most
// threads holding one or two elements.  grid ceil(N / (LN_ROWS / RW)),
// block 32 LN_ROWS.  out, inp (N, C) (out may equal inp); mean, rstd (N) or
// NULL; weight, bias (C).  NPER > 0: C = 32 NPER RW (SD's 320, 640, 1280
// as NPER 10 with RW 1, 2, 4; CLIP's 768 as 24 with RW 1), each lane's
// elements loaded into registers at once and used from there (call 4,
// before: 12.5 us a launch at 8192 x 320, half the memory's speed, each
// lane waiting on its loads one after another and reading the row three
// times); NPER 0: any C, RW 1, read from memory each pass.  Warp w of a
// row holds its w-th RW-th of it, lane l elements l, l + 32, ... of that:
// for a given (NPER, RW) the same additions in the same order, the same
// bits.  (Call 9, H200: with a warp per row at 1280, 40 elements a lane,
// 141 registers and 512 warps for SD1.5's 16x16 level, a launch took 17
// us for 2.6 MB each way; RW 4 holds 10 a lane, as 320 does, on 4x the warps.)

// The sum over the row's RW warps of v (each warp's lanes holding its
// warp's total): in warp order, from red (LN_ROWS doubles of shared
// memory, reused: the barrier first lets an earlier call's readers finish).
// Every warp of the block calls it (rows past N too: a barrier).
template <int RW> __device__ __forceinline__ static double ln_row_sum(double v, double *red)
{
    if (RW == 1)
        return v;
    const int w = threadIdx.x >> 5, w0 = w / RW * RW;
    __syncthreads();
    if ((threadIdx.x & 31) == 0)
        red[w] = v;
    __syncthreads();
    double t = red[w0];
#pragma unroll
    for (int k = 1; k < RW; k++)
        t += red[w0 + k];
    return t;
}

template <int NPER, int RW>
__global__ static void layernorm_forward_kernel(float *out, void *out16, int f16, float *mean, float *rstd,
                                                const float *inp, const float *weight, const float *bias, int N, int C,
                                                float eps)
{
    static_assert(RW == 1 || (NPER > 0 && LN_ROWS % RW == 0), "RW warps a row need NPER > 0 and divide LN_ROWS");
    __shared__ double red[RW > 1 ? LN_ROWS : 1];
    if (NPER)
        C = 32 * NPER * RW;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int r = blockIdx.x * (LN_ROWS / RW) + w / RW;
    const bool live = r < N;
    if (RW == 1 && !live) // the whole warp (no barrier below)
        return;
    const int base = RW > 1 ? (w % RW) * (C / RW) : 0; // this warp's part of the row
    const float *x = inp + (size_t)(live ? r : 0) * C + base;
    float *y = out + (size_t)(live ? r : 0) * C + base;
    const int nq = !live ? 0 : NPER ? NPER : lane < C ? (C - 1 - lane) / 32 + 1 : 0; // this lane's elements
    float v[NPER ? NPER : 1];
    if (NPER && live) {
#pragma unroll
        for (int q = 0; q < (NPER ? NPER : 1); q++)
            v[q] = x[lane + 32 * q];
    }
    auto at = [&](int q) { return NPER ? v[NPER ? q : 0] : x[lane + 32 * q]; };
    double s = 0;
#pragma unroll
    for (int q = 0; q < nq; q++)
        s += at(q);
    const float mu = (float)(ln_row_sum<RW>(db_warp_sum(s), red) / C);
    double s2 = 0;
#pragma unroll
    for (int q = 0; q < nq; q++) {
        const double d = (double)at(q) - mu;
        s2 += d * d;
    }
    const double var = ln_row_sum<RW>(db_warp_sum(s2), red) / C;
    const float rs = (float)(1.0 / sqrt(var + (double)eps));
    if (!live)
        return; // (no barrier follows)
    if (lane == 0 && base == 0) {
        if (mean)
            mean[r] = mu;
        if (rstd)
            rstd[r] = rs;
    }
    const size_t y0 = (size_t)r * C + base; // (out16's index of y[0])
#pragma unroll
    for (int q = 0; q < nq; q++) {
        const int i = lane + 32 * q;
        const float o = (at(q) - mu) * rs * weight[base + i] + bias[base + i];
        y[i] = o;
        if (out16)
            db_cuda_store16(out16, y0 + i, o, f16);
    }
}

// The widths held in registers: 320, 640, 1280 as 10 a lane on 1, 2 or 4
// warps a row; 768 (CLIP) as 24 on one; anything else NPER 0.
#define DB_LN_DISPATCH(KERNEL, C, N, ...)                                                                              \
    do {                                                                                                               \
        const unsigned bl_ = 32 * LN_ROWS;                                                                             \
        const auto grid_ = [&](int rw) { return (unsigned)(((N) + LN_ROWS / rw - 1) / (LN_ROWS / rw)); };            \
        switch (C) {                                                                                                   \
        case 320: KERNEL<10, 1><<<grid_(1), bl_, 0, st>>>(__VA_ARGS__); break;                                        \
        case 640: KERNEL<10, 2><<<grid_(2), bl_, 0, st>>>(__VA_ARGS__); break;                                        \
        case 768: KERNEL<24, 1><<<grid_(1), bl_, 0, st>>>(__VA_ARGS__); break;                                        \
        case 1280: KERNEL<10, 4><<<grid_(4), bl_, 0, st>>>(__VA_ARGS__); break;                                       \
        default: KERNEL<0, 1><<<grid_(1), bl_, 0, st>>>(__VA_ARGS__);                                                 \
        }                                                                                                              \
    } while (0)

extern "C" int db_cuda_layernorm_forward(db_ctx *c, float *out, float *mean, float *rstd, const float *inp,
                                         const float *weight, const float *bias, int N, int C, float eps)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    cudaStream_t st = db_cuda_st(c)->stream;
    // the output's 16-bit twin for the linear that reads it next (cuda.h)
    void *o16 = db_cuda_twin_alloc(c, (size_t)N * C);
    if (c->err.code)
        return -1;
    const int f16 = c->precision == DB_PREC_F16;
    DB_LN_DISPATCH(layernorm_forward_kernel, C, N, out, o16, f16, mean, rstd, inp, weight, bias, N, C, eps);
    return db_cuda_twin_launched(c, out, (size_t)N * C, o16, "layernorm kernel");
}

// grid N, block ROW_THREADS.  out, inp (N, C); out may equal inp.
__global__ static void softmax_forward_kernel(float *out, const float *inp, int C)
{
    __shared__ float shf[32];
    __shared__ double sh[32];
    const float *x = inp + (size_t)blockIdx.x * C;
    float *y = out + (size_t)blockIdx.x * C;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        mx = fmaxf(mx, x[i]);
    mx = db_block_max(mx, shf);
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        s += expf(x[i] - mx);
    const float inv = (float)(1.0 / db_block_sum(s, sh));
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        y[i] = expf(x[i] - mx) * inv; // the same expf value the sum saw
}

extern "C" int db_cuda_softmax_forward(db_ctx *c, float *out, const float *inp, int N, int C)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    softmax_forward_kernel<<<N, ROW_THREADS, 0, db_cuda_st(c)->stream>>>(out, inp, C);
    DB_LAUNCHED(c);
    return 0;
}

// ---- backward -----------------------------------------------------------------------

// dy after the fused SiLU's derivative (z = the affine output), as norm_backward.c
__device__ __forceinline__ float gn_dy(float dy, float xh, float w, float bb, int silu)
{
    if (silu) {
        const float z = xh * w + bb, sg = 1.0f / (1.0f + expf(-z));
        dy *= sg * (1.0f + z * (1.0f - sg));
    }
    return dy;
}

// One element's pieces of the backward, written once for the pieces'
// kernels and the whole-group one (same code, same contraction, same bits):
// xhat, and dy (after the SiLU's derivative) added to the two sums
__device__ __forceinline__ static float gn_bdy(float x, float d, float mu, float rs, float w, float bb, int silu,
                                              double *s_dy, double *s_dyx)
{
    const float xh = (x - mu) * rs, dy = gn_dy(d, xh, w, bb, silu);
    *s_dy += dy;
    *s_dyx += (double)dy * xh;
    return dy;
}
// dinp from dy, xhat and the group's two means
__device__ __forceinline__ static float gn_bdx(float x, float dy, float mu, float rs, float w, float mg, float mgx)
{
    const float xh = (x - mu) * rs;
    return rs * (dy * w - mg - xh * mgx);
}
// The group's two means of the backward (mg = mean(dy w), mgx = mean(dy
// xhat w)) from its cg K per-piece sums, per channel in piece order, then
// over the channels in order, as norm_backward.c.
__device__ static void gn_bmeans(const double *vdy, const double *vdyx, const float *weight, int g, int cg, int K,
                                 int HW, float *mg, float *mgx)
{
    double sum_g = 0, sum_gx = 0;
    for (int ch = 0; ch < cg; ch++) {
        const int cc = g * cg + ch;
        double s_dy = 0, s_dyx = 0;
        for (int j = 0; j < K; j++)
            s_dy += vdy[ch * K + j], s_dyx += vdyx[ch * K + j];
        sum_g += s_dy * weight[cc];
        sum_gx += s_dyx * weight[cc];
    }
    const double n = (double)cg * HW;
    *mg = (float)(sum_g / n), *mgx = (float)(sum_gx / n);
}

// The backward in the forward's pieces.  grid P, block GN_THREADS: per
// piece pdy = sum(dy), pdyx = sum(dy * xhat), dy after the SiLU's derivative.
__global__ static void groupnorm_bsum_kernel(double *pdy, double *pdyx, const float *dout, const float *mean,
                                             const float *rstd, const float *inp, const float *weight,
                                             const float *bias, int C, int HW, int G, int K, int L, int silu)
{
    __shared__ double sh[32];
    const int p = blockIdx.x, k = p % K, bc = p / K, b = bc / C, c = bc % C, bg = b * G + c / (C / G);
    const float mu = mean[bg], rs = rstd[bg], w = weight[c], bb = bias[c];
    const float *x = inp + (size_t)bc * HW, *d = dout + (size_t)bc * HW;
    const int i1 = min(HW, (k + 1) * L);
    double s_dy = 0, s_dyx = 0;
    for (int i = k * L + threadIdx.x; i < i1; i += blockDim.x)
        gn_bdy(x[i], d[i], mu, rs, w, bb, silu, &s_dy, &s_dyx);
    s_dy = db_block_sum(s_dy, sh);
    s_dyx = db_block_sum(s_dyx, sh);
    if (threadIdx.x == 0)
        pdy[p] = s_dy, pdyx[p] = s_dyx;
}

// dinp's value: v, or add + v (add NULL: none), the float32 sum
// db_add_forward makes (add may be dinp: each element read by the thread
// that writes it)
__device__ __forceinline__ static float gn_put(const float *add, size_t i, float v)
{
    return add ? __fadd_rn(add[i], v) : v;
}

// grid P, block GN_THREADS.  dinp (B, C, HW): per channel the pieces'
// sums in order, then over the group's channels weighted, as norm_backward.c
// (+ add: gn_put).
__global__ static void groupnorm_bapply_kernel(float *dinp, const double *pdy, const double *pdyx, const float *dout,
                                               const float *mean, const float *rstd, const float *inp,
                                               const float *weight, const float *bias, const float *add, int C,
                                               int HW, int G, int K, int L, int silu)
{
    __shared__ double st[2 * GN_THREADS];
    __shared__ float smg, smgx;
    const int p = blockIdx.x, k = p % K, bc = p / K, b = bc / C, c = bc % C, cg = C / G, g = c / cg;
    // the group's pieces staged (gn_stage), then summed per channel in order
    const double *vdy = gn_stage(st, GN_THREADS, gn_group(pdy, b, g, C, cg, K), cg * K);
    const double *vdyx = gn_stage(st + GN_THREADS, GN_THREADS, gn_group(pdyx, b, g, C, cg, K), cg * K);
    if (threadIdx.x == 0)
        gn_bmeans(vdy, vdyx, weight, g, cg, K, HW, &smg, &smgx);
    __syncthreads();
    const int bg = b * G + g;
    const float mu = mean[bg], rs = rstd[bg], w = weight[c], bb = bias[c], mg = smg, mgx = smgx;
    const float *x = inp + (size_t)bc * HW, *d = dout + (size_t)bc * HW;
    float *dx = dinp + (size_t)bc * HW;
    const int i1 = min(HW, (k + 1) * L);
    for (int i = k * L + threadIdx.x; i < i1; i += blockDim.x) {
        double unused0 = 0, unused1 = 0;
        const float dy = gn_bdy(x[i], d[i], mu, rs, w, bb, silu, &unused0, &unused1);
        dx[i] = gn_put(add, (size_t)bc * HW + i, gn_bdx(x[i], dy, mu, rs, w, mg, mgx));
    }
}

// The backward of a group that fits in shared memory (the forward's
// groupnorm_whole_kernel, the same plan: one block a group or a cluster of
// cl, each taking a stretch of pieces), bsum and bapply in one launch: the
// stretch's x and dout come into shared memory by cp.async, every copy in
// flight at once; each piece's dy (after the SiLU's derivative) replaces
// its dout there as it is summed (a warp a piece, each lane standing for
// GN_WARPS of bsum's threads: their strides, their order, db_block_sum's
// tree by db_warp_part_sum); the group's means come from gn_bmeans over
// all np sums (gw_gather) as in bapply, and dinp from the two in shared
// memory: x and dout are read from global memory once.  The per-piece
// sums go to pdy / pdyx as bsum's do, for groupnorm_bparams_kernel.  grid
// B G cl, block GW_THREADS, dynamic shared memory gw_smem(xcap, cg K, 2).
// H200: 35 us a launch (fifth call) and 32.3 (sixth) a block a group with
// x and dout read by plain loads, a warp a piece; 39.5 in clusters of two
// (seventh: 20 of the 32 warps summing, each waiting on its loads one
// iteration after another).
__global__ static void __launch_bounds__(GW_THREADS)
    groupnorm_bwhole_kernel(float *dinp, double *pdy, double *pdyx, const float *dout, const float *mean,
                            const float *rstd, const float *inp, const float *weight, const float *bias,
                            const float *add, int C, int HW, int G, int K, int L, int silu, int cl, int xcap)
{
    extern __shared__ __align__(16) float smem[]; // float4 and cp.async's 16 bytes
    const gw_stretch t = gw_stretch_of(C, HW, G, K, L, cl);
    const int bg = t.bg, b = t.b, g = t.g, cg = t.cg, n = t.n, np = t.np, j0 = t.j0, j1 = t.j1, e0 = t.e0, ne = t.ne;
    float *xs = smem, *ds = smem + xcap; // x and dout (then dy) of this block's stretch [e0, e0 + ne)
    double *vdy = (double *)(smem + 2 * xcap), *vdyx = vdy + np, *gdy = vdyx + np, *gdyx = gdy + np;
    float *sc = (float *)(gdyx + np); // the group's two means
    const float mu = mean[bg], rs = rstd[bg];
    const float *x = inp + (size_t)bg * n + e0, *d = dout + (size_t)bg * n + e0;
    float *dx = dinp + (size_t)bg * n + e0;
    const float *ad = add ? add + (size_t)bg * n + e0 : NULL; // (gn_put)
    const int vec = ne % 4 == 0 && ((uintptr_t)x & 15) == 0 && ((uintptr_t)d & 15) == 0 && ((uintptr_t)dx & 15) == 0 &&
                    ((uintptr_t)ad & 15) == 0;
    if (vec) {
        for (int i = threadIdx.x; i < ne / 4; i += GW_THREADS) {
            db_cp::copy16((float4 *)xs + i, (const float4 *)x + i, 16);
            db_cp::copy16((float4 *)ds + i, (const float4 *)d + i, 16);
        }
        db_cp::commit();
        db_cp::wait<0>();
    } else {
        for (int i = threadIdx.x; i < ne; i += GW_THREADS)
            xs[i] = x[i], ds[i] = d[i];
    }
    __syncthreads();
    const int wi = (int)(threadIdx.x / 32), lane = (int)(threadIdx.x & 31);
    for (int j = j0 + wi; j < j1; j += GW_WARPS) {
        const int c = g * cg + j / K, p0 = gw_piece_start(j, HW, K, L) - e0, len = gn_piece_len(j, HW, K, L);
        const float w = weight[c], bb = bias[c];
        float *xp = xs + p0, *dp = ds + p0;
        double a[GN_WARPS], e[GN_WARPS];
#pragma unroll
        for (int u = 0; u < GN_WARPS; u++)
            a[u] = 0, e[u] = 0;
        for (int base = 0; base < len; base += GN_THREADS) {
#pragma unroll
            for (int u = 0; u < GN_WARPS; u++) {
                const int i = base + 32 * u + lane;
                if (i < len)
                    dp[i] = gn_bdy(xp[i], dp[i], mu, rs, w, bb, silu, &a[u], &e[u]);
            }
        }
        const double s_dy = db_warp_part_sum(a), s_dyx = db_warp_part_sum(e);
        if (lane == 0) {
            vdy[j] = s_dy, vdyx[j] = s_dyx;
            const size_t p = ((size_t)b * C + (size_t)g * cg) * K + (size_t)j;
            pdy[p] = s_dy, pdyx[p] = s_dyx;
        }
    }
    const double *wdy, *wdyx;
    gw_gather(&wdy, &wdyx, vdy, vdyx, gdy, gdyx, np, cl);
    __syncthreads();
    if (threadIdx.x == 0)
        gn_bmeans(wdy, wdyx, weight, g, cg, K, HW, &sc[0], &sc[1]);
    __syncthreads();
    const float mg = sc[0], mgx = sc[1];
    if (vec) {
        // (the four may straddle two channels: each finds its own, unless
        // they share one, as in the forward)
        const bool same4 = HW % 4 == 0 && e0 % 4 == 0;
        for (int i = threadIdx.x; i < ne / 4; i += GW_THREADS) {
            const float4 xv = ((const float4 *)xs)[i], dv = ((const float4 *)ds)[i];
            const float xe[4] = {xv.x, xv.y, xv.z, xv.w}, de[4] = {dv.x, dv.y, dv.z, dv.w};
            float o[4];
            const float w4 = same4 ? weight[g * cg + (e0 + 4 * i) / HW] : 0.0f;
            for (int q = 0; q < 4; q++)
                o[q] = gn_put(ad, 4 * (size_t)i + q,
                              gn_bdx(xe[q], de[q], mu, rs, same4 ? w4 : weight[g * cg + (e0 + 4 * i + q) / HW], mg,
                                     mgx));
            ((float4 *)dx)[i] = make_float4(o[0], o[1], o[2], o[3]);
        }
    } else {
        for (int i = threadIdx.x; i < ne; i += GW_THREADS) {
            const int c = g * cg + (e0 + i) / HW;
            dx[i] = gn_put(ad, i, gn_bdx(xs[i], ds[i], mu, rs, weight[c], mg, mgx));
        }
    }
    if (cl > 1)
        db_cl::wait(); // the others may still be reading vdy, vdyx
}

// One thread per channel: dweight (C) += sum_b sum_k pdyx, dbias (C) +=
// sum_b sum_k pdy (each NULL or not; put DB_PUT_FRESH: assigned), per (b, c)
// first, b in order.
__global__ static void groupnorm_bparams_kernel(float *dweight, float *dbias, const double *pdy, const double *pdyx,
                                                int B, int C, int K, int put)
{
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C)
        return;
    double sw = 0, sb = 0;
    for (int b = 0; b < B; b++) {
        const size_t q = ((size_t)b * C + c) * K;
        double s_dy = 0, s_dyx = 0;
        for (int j = 0; j < K; j++)
            s_dy += pdy[q + j], s_dyx += pdyx[q + j];
        sw += s_dyx, sb += s_dy;
    }
    if (dweight)
        db_cuda_put(dweight + c, (float)sw, put);
    if (dbias)
        db_cuda_put(dbias + c, (float)sb, put);
}

extern "C" int db_cuda_groupnorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                          const float *mean, const float *rstd, const float *inp, const float *weight,
                                          const float *bias, int B, int C, int HW, int G, int silu, int assign)
{
    return db_cuda_groupnorm_backward_add(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, bias, NULL, B, C, HW,
                                          G, silu, assign);
}

extern "C" int db_cuda_groupnorm_backward_add(db_ctx *c, float *dinp, float *dweight, float *dbias,
                                              const float *dout, const float *mean, const float *rstd,
                                              const float *inp, const float *weight, const float *bias,
                                              const float *add, int B, int C, int HW, int G, int silu, int assign)
{
    DB_ENTER(c);
    if (B * G == 0 || HW == 0 || (!dinp && !dweight && !dbias))
        return 0;
    gn_split sp;
    int P;
    double *part = gn_scratch(c, B, C, HW, &sp, &P);
    if (!part)
        return -1;
    cudaStream_t st = db_cuda_st(c)->stream;
    const gw_plan wp = dinp ? gw_choose(c, groupnorm_bwhole_kernel, 2, B, C, HW, G, sp.K, sp.L) : gw_plan{0, 0, 0};
    cudaError_t e = cudaSuccess;
    if (wp.cl) {
        if (db_cuda_smem_optin(c, groupnorm_bwhole_kernel, wp.smem) != 0) {
            db_cuda_free(c, part);
            return -1;
        }
        e = db_cl::launch(groupnorm_bwhole_kernel, B * G * wp.cl, GW_THREADS, wp.smem, st, wp.cl, dinp, part, part + P,
                          dout, mean, rstd, inp, weight, bias, add, C, HW, G, sp.K, sp.L, silu, wp.cl, wp.xcap);
    } else {
        groupnorm_bsum_kernel<<<P, GN_THREADS, 0, st>>>(part, part + P, dout, mean, rstd, inp, weight, bias, C, HW, G,
                                                        sp.K, sp.L, silu);
        if (dinp)
            groupnorm_bapply_kernel<<<P, GN_THREADS, 0, st>>>(dinp, part, part + P, dout, mean, rstd, inp, weight, bias,
                                                              add, C, HW, G, sp.K, sp.L, silu);
    }
    if (e == cudaSuccess && (dweight || dbias))
        groupnorm_bparams_kernel<<<(C + 127) / 128, 128, 0, st>>>(dweight, dbias, part, part + P, B, C, sp.K,
                                                                     db_cuda_put_param(assign));
    if (e == cudaSuccess)
        e = cudaGetLastError();
    db_cuda_free(c, part);
    DB_CU(c, e);
    return 0;
}

// RW warps per row, as the forward.  grid ceil(N / (LN_ROWS / RW)), block
// 32 LN_ROWS.  dinp, dout, inp (N, C); mean, rstd (N); weight (C).  NPER
// and RW as the forward's: C = 32 NPER RW with the row's dout and x in
// registers (loaded at once, read once), or NPER 0 (RW 1) for any C.
// add (NULL: none): dinp = add + the gradient, the float32 sum db_add_forward
// makes (add may be dinp: each element read by the thread that writes it)
template <int NPER, int RW>
__global__ static void layernorm_backward_dinp_kernel(float *dinp, void *dinp16, int f16, const float *dout,
                                                      const float *mean, const float *rstd, const float *inp,
                                                      const float *weight, const float *add, int N, int C)
{
    static_assert(RW == 1 || (NPER > 0 && LN_ROWS % RW == 0), "RW warps a row need NPER > 0 and divide LN_ROWS");
    __shared__ double red[RW > 1 ? LN_ROWS : 1];
    if (NPER)
        C = 32 * NPER * RW;
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    const int r = blockIdx.x * (LN_ROWS / RW) + w / RW;
    const bool live = r < N;
    if (RW == 1 && !live)
        return;
    const int base = RW > 1 ? (w % RW) * (C / RW) : 0;
    const size_t row = (size_t)(live ? r : 0) * C + base;
    const float *x = inp + row, *dy = dout + row, *wt = weight + base;
    const float mu = live ? mean[r] : 0.0f, rs = live ? rstd[r] : 0.0f;
    const int nq = !live ? 0 : NPER ? NPER : lane < C ? (C - 1 - lane) / 32 + 1 : 0; // this lane's elements
    float dv[NPER ? NPER : 1], xv[NPER ? NPER : 1];
    if (NPER && live) {
#pragma unroll
        for (int q = 0; q < (NPER ? NPER : 1); q++)
            dv[q] = dy[lane + 32 * q], xv[q] = x[lane + 32 * q];
    }
    auto dy_at = [&](int q) { return NPER ? dv[NPER ? q : 0] : dy[lane + 32 * q]; };
    auto x_at = [&](int q) { return NPER ? xv[NPER ? q : 0] : x[lane + 32 * q]; };
    double sg = 0, sgx = 0;
#pragma unroll
    for (int q = 0; q < nq; q++) {
        const float g = dy_at(q) * wt[lane + 32 * q];
        sg += g;
        sgx += (double)g * ((x_at(q) - mu) * rs);
    }
    sg = ln_row_sum<RW>(db_warp_sum(sg), red);
    sgx = ln_row_sum<RW>(db_warp_sum(sgx), red);
    if (!live)
        return;
    const float mg = (float)(sg / C), mgx = (float)(sgx / C);
    float *dx = dinp + row;
#pragma unroll
    for (int q = 0; q < nq; q++) {
        const int i = lane + 32 * q;
        const float v = rs * (dy_at(q) * wt[i] - mg - (x_at(q) - mu) * rs * mgx);
        const float o = add ? __fadd_rn(add[row + i], v) : v;
        dx[i] = o;
        if (dinp16)
            db_cuda_store16(dinp16, row + i, o, f16);
    }
}

// grid (ceil(C / 128), nchunk), block 128.  partw, partb (nchunk, C): over each
// chunk of `rows` rows (db_cuda_part_rows) in order, sum(dy * xhat) and
// sum(dy) per column.
// tickets (NULL: none): the last block of a column tile finishes the
// tile's columns of jw and jb (db_cuda_colsum_last; a job with dst NULL is
// skipped).
__device__ static void layernorm_param_col(double *partw, double *partb, const float *dout, const float *mean,
                                           const float *rstd, const float *inp, int N, int C, int rows, int j, int r0);
__global__ static void layernorm_backward_param_kernel(double *partw, double *partb, const float *dout,
                                                       const float *mean, const float *rstd, const float *inp, int N,
                                                       int C, int rows, unsigned *tickets, db_colsum_job jw,
                                                       db_colsum_job jb)
{
    const int j = blockIdx.x * blockDim.x + threadIdx.x, r0 = blockIdx.y * rows;
    if (j < C)
        layernorm_param_col(partw, partb, dout, mean, rstd, inp, N, C, rows, j, r0);
    if (tickets && db_cuda_colsum_last(&tickets[blockIdx.x], gridDim.y)) {
        const int j0 = blockIdx.x * blockDim.x, j1 = j0 + (int)blockDim.x < C ? j0 + (int)blockDim.x : C;
        if (jw.dst)
            db_cuda_colsum_finish(jw, j0, j1);
        if (jb.dst)
            db_cuda_colsum_finish(jb, j0, j1);
    }
}

// (layernorm_backward_param_kernel's column j, rows [r0, r0 + rows))
__device__ static void layernorm_param_col(double *partw, double *partb, const float *dout, const float *mean,
                                           const float *rstd, const float *inp, int N, int C, int rows, int j, int r0)
{
    const int r1 = r0 + rows < N ? r0 + rows : N;
    double sw = 0, sb = 0;
    int r = r0;
    // the loads of four rows in flight before their sums, which keep their
    // order (gemm.cu colsum_part_kernel: the same bits, less waiting)
    for (; r + 4 <= r1; r += 4) {
        float dy[4], xh[4];
#pragma unroll
        for (int k = 0; k < 4; k++) {
            dy[k] = dout[(size_t)(r + k) * C + j];
            xh[k] = (inp[(size_t)(r + k) * C + j] - mean[r + k]) * rstd[r + k];
        }
#pragma unroll
        for (int k = 0; k < 4; k++) {
            sw += (double)dy[k] * xh[k];
            sb += dy[k];
        }
    }
    for (; r < r1; r++) {
        const float dy = dout[(size_t)r * C + j];
        sw += (double)dy * ((inp[(size_t)r * C + j] - mean[r]) * rstd[r]);
        sb += dy;
    }
    partw[(size_t)blockIdx.y * C + j] = sw;
    partb[(size_t)blockIdx.y * C + j] = sb;
}

extern "C" int db_cuda_layernorm_backward(db_ctx *c, float *dinp, float *dweight, float *dbias, const float *dout,
                                          const float *mean, const float *rstd, const float *inp, const float *weight,
                                          int N, int C, int assign)
{
    return db_cuda_layernorm_backward_add(c, dinp, dweight, dbias, dout, mean, rstd, inp, weight, NULL, N, C, assign);
}

extern "C" int db_cuda_layernorm_backward_add(db_ctx *c, float *dinp, float *dweight, float *dbias,
                                              const float *dout, const float *mean, const float *rstd,
                                              const float *inp, const float *weight, const float *add, int N, int C,
                                              int assign)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    cudaStream_t s = db_cuda_st(c)->stream;
    if (dweight || dbias) {
        const int rows = db_cuda_part_rows(N), nchunk = (N + rows - 1) / rows;
        double *part = (double *)db_cuda_alloc(c, sizeof(double) * 2 * (size_t)nchunk * C);
        if (!part)
            return -1;
        dim3 grid((unsigned)((C + 127) / 128), (unsigned)nchunk);
        unsigned *tk = grid.x <= DB_CUDA_TICKETS ? db_cuda_tickets(c) : NULL;
        const int put = db_cuda_put_param(assign);
        const db_colsum_job jw{dweight, part, nchunk, C, 0, put}, jb{dbias, part + (size_t)nchunk * C, nchunk, C, 0, put};
        layernorm_backward_param_kernel<<<grid, 128, 0, s>>>(part, part + (size_t)nchunk * C, dout, mean, rstd, inp, N,
                                                             C, rows, tk, jw, jb);
        cudaError_t e = cudaGetLastError();
        int r = 0;
        if (e == cudaSuccess)
            r = db_cuda_colsum_done(c, tk, jw) | db_cuda_colsum_done(c, tk, jb);
        db_cuda_free(c, part);
        DB_CU(c, e);
        if (r)
            return -1;
    }
    // dinp last (the parameters' sums above read none of it), with its
    // 16-bit twin (cuda.h): a linear's backward reads it next
    if (!dinp)
        return 0;
    void *d16 = db_cuda_twin_alloc(c, (size_t)N * C);
    if (c->err.code)
        return -1;
    cudaStream_t st = s;
    const int f16 = c->precision == DB_PREC_F16;
    DB_LN_DISPATCH(layernorm_backward_dinp_kernel, C, N, dinp, d16, f16, dout, mean, rstd, inp, weight, add, N, C);
    return db_cuda_twin_launched(c, dinp, (size_t)N * C, d16, "layernorm backward kernel");
}

// grid N, block ROW_THREADS.  dinp, dout, out (N, C): dx = y (dy - sum(dy y)).
__global__ static void softmax_backward_kernel(float *dinp, const float *dout, const float *out, int C)
{
    __shared__ double sh[32];
    const float *y = out + (size_t)blockIdx.x * C, *dy = dout + (size_t)blockIdx.x * C;
    double s = 0;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        s += (double)dy[i] * y[i];
    const float sf = (float)db_block_sum(s, sh);
    float *dx = dinp + (size_t)blockIdx.x * C;
    for (int i = threadIdx.x; i < C; i += blockDim.x)
        dx[i] = y[i] * (dy[i] - sf);
}

extern "C" int db_cuda_softmax_backward(db_ctx *c, float *dinp, const float *dout, const float *out, int N, int C)
{
    DB_ENTER(c);
    if (N == 0)
        return 0;
    softmax_backward_kernel<<<N, ROW_THREADS, 0, db_cuda_st(c)->stream>>>(dinp, dout, out, C);
    DB_LAUNCHED(c);
    return 0;
}
