/* conv2d through oneDNN.
 *
 * The primitive is created with format "any" for source, weights and
 * destination so oneDNN picks its fast layout (on AVX-512: nChw16c
 * activations, OIhw16i16o weights, the brgconv kernels at ~95% of the
 * sgemm peak); our NCHW/OIHW tensors are reordered in and out around it.
 * Measured at SD1.5 shapes the activation reorders cost 1-3% of the
 * convolution, but the weight reorder grows with C*OC while the work shrinks
 * with the image: at 8x8 it cost as much as the convolution (1280->1280:
 * 6.2 + 5.3 ms; 2560->1280: 21 + 9 ms).  So outputs of at most SMALL_HW
 * pixels take an im2col + GEMM path that reads OIHW weights as they are.
 * That path is ours (im2col, then db_cpu_sgemm_fixed: fixed output tiles,
 * one sequential sgemm each) rather than oneDNN's NCHW convolution, whose
 * threaded GEMM splits the reduction by the thread count: measured at
 * 1280->1280 16x16 and 8x8, its results differed between 1 and 2 threads,
 * while the blocked brgconv path gave the same bits at 1 to 7 threads.
 * Every convolution is so bit-identical at any thread count, which training
 * promises (same inputs, same gradients).
 *
 * Everything shape-dependent (primitive descriptors, JIT kernels, reorders,
 * memory objects) is built once per shape and kept in the ctx cache; a call
 * only swaps data pointers in.  The blocked buffers and oneDNN's scratchpad
 * come from the ctx scratch.
 *
 * A 1x1 convolution with stride 1 and no padding is a GEMM in NCHW itself,
 * out[b] (OC, HW) = weight (OC, C) @ inp[b] (C, HW): it skips oneDNN's
 * convolution and its reorders (measured equal or faster at SD1.5's
 * proj_in/proj_out and shortcut shapes), through the same fixed tiles. */
#include <stdlib.h>

#include "kernels/cpu/cpu.h"

enum { SMALL_HW = 256 }; /* output pixels up to which im2col + GEMM beats blocked */

typedef struct conv_plan {
    dnnl_primitive_t conv;
    dnnl_primitive_t src_reorder, wei_reorder, dst_reorder; /* NULL: layouts already match */
    dnnl_memory_t user_src, user_wei, user_dst, bias;       /* our tensors */
    dnnl_memory_t src, wei, dst, pad;                       /* oneDNN's layouts, scratchpad */
    size_t src_bytes, wei_bytes, dst_bytes, pad_bytes;      /* scratch each needs (0: none) */
} conv_plan;

static void plan_destroy(void *p)
{
    conv_plan *pl = p;
    dnnl_primitive_t prims[] = {pl->conv, pl->src_reorder, pl->wei_reorder, pl->dst_reorder};
    dnnl_memory_t mems[] = {pl->user_src, pl->user_wei, pl->user_dst, pl->bias, pl->src, pl->wei, pl->dst, pl->pad};
    for (size_t i = 0; i < sizeof prims / sizeof prims[0]; i++)
        if (prims[i])
            dnnl_primitive_destroy(prims[i]);
    for (size_t i = 0; i < sizeof mems / sizeof mems[0]; i++)
        if (mems[i])
            dnnl_memory_destroy(mems[i]);
    free(pl);
}

/* If oneDNN's layout `want` differs from ours (`user`), make a reorder (in the
 * direction given) and a memory object for the reordered buffer. */
static dnnl_status_t make_reorder(db_cpu *cpu, const dnnl_memory_desc_t *user, const dnnl_memory_desc_t *want,
                                  int to_user, dnnl_primitive_t *reorder, dnnl_memory_t *mem, size_t *bytes)
{
    *reorder = NULL;
    *mem = NULL;
    *bytes = 0;
    if (dnnl_memory_desc_equal(user, want))
        return dnnl_success;
    dnnl_primitive_desc_t pd;
    dnnl_status_t s = to_user ? dnnl_reorder_primitive_desc_create(&pd, want, cpu->engine, user, cpu->engine, NULL)
                              : dnnl_reorder_primitive_desc_create(&pd, user, cpu->engine, want, cpu->engine, NULL);
    if (s != dnnl_success)
        return s;
    s = dnnl_primitive_create(reorder, pd);
    dnnl_primitive_desc_destroy(pd);
    if (s != dnnl_success)
        return s;
    *bytes = dnnl_memory_desc_get_size(want);
    return dnnl_memory_create(mem, want, cpu->engine, DNNL_MEMORY_NONE);
}

static int plan_create(db_ctx *c, conv_plan **out, int has_bias, int B, int C, int H, int W, int OC, int KH, int KW,
                       int stride, int pad0, int pad1)
{
    db_cpu *cpu = c->cpu;
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    dnnl_dims_t src_dims = {B, C, H, W}, wei_dims = {OC, C, KH, KW}, bias_dims = {OC}, dst_dims = {B, OC, OH, OW};
    dnnl_dims_t strides = {stride, stride}, pad_l = {pad0, pad0}, pad_r = {pad1, pad1};
    const dnnl_format_tag_t act = OH * OW <= SMALL_HW ? dnnl_nchw : dnnl_format_tag_any;
    dnnl_memory_desc_t src_any, wei_any, dst_any, bias_md, src_user, wei_user, dst_user;
    dnnl_memory_desc_init_by_tag(&src_any, 4, src_dims, dnnl_f32, act);
    dnnl_memory_desc_init_by_tag(&wei_any, 4, wei_dims, dnnl_f32, dnnl_format_tag_any);
    dnnl_memory_desc_init_by_tag(&dst_any, 4, dst_dims, dnnl_f32, act);
    dnnl_memory_desc_init_by_tag(&bias_md, 1, bias_dims, dnnl_f32, dnnl_x);
    dnnl_memory_desc_init_by_tag(&src_user, 4, src_dims, dnnl_f32, dnnl_nchw);
    dnnl_memory_desc_init_by_tag(&wei_user, 4, wei_dims, dnnl_f32, dnnl_oihw);
    dnnl_memory_desc_init_by_tag(&dst_user, 4, dst_dims, dnnl_f32, dnnl_nchw);

    conv_plan *pl = calloc(1, sizeof *pl);
    if (!pl)
        return db_err_set(&c->err, DB_ENOMEM, "conv2d: out of memory");
    const char *what = "convolution descriptor";
    dnnl_primitive_attr_t attr = NULL;
    dnnl_primitive_desc_t pd = NULL;
    dnnl_convolution_desc_t cd;
    dnnl_status_t s = dnnl_convolution_forward_desc_init(&cd, dnnl_forward_inference, dnnl_convolution_direct,
                                                         &src_any, &wei_any, has_bias ? &bias_md : NULL, &dst_any,
                                                         strides, pad_l, pad_r);
    if (s != dnnl_success)
        goto fail;
    /* Our scratch, not a per-primitive allocation, holds oneDNN's temporaries. */
    what = "attributes";
    if ((s = dnnl_primitive_attr_create(&attr)) != dnnl_success ||
        (s = dnnl_primitive_attr_set_scratchpad_mode(attr, dnnl_scratchpad_mode_user)) != dnnl_success)
        goto fail;
    what = "convolution primitive";
    if ((s = dnnl_primitive_desc_create(&pd, &cd, attr, cpu->engine, NULL)) != dnnl_success ||
        (s = dnnl_primitive_create(&pl->conv, pd)) != dnnl_success)
        goto fail;
    const dnnl_memory_desc_t *src_md = dnnl_primitive_desc_query_md(pd, dnnl_query_src_md, 0);
    const dnnl_memory_desc_t *wei_md = dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    const dnnl_memory_desc_t *dst_md = dnnl_primitive_desc_query_md(pd, dnnl_query_dst_md, 0);
    const dnnl_memory_desc_t *pad_md = dnnl_primitive_desc_query_md(pd, dnnl_query_scratchpad_md, 0);
    what = "reorders";
    if ((s = make_reorder(cpu, &src_user, src_md, 0, &pl->src_reorder, &pl->src, &pl->src_bytes)) != dnnl_success ||
        (s = make_reorder(cpu, &wei_user, wei_md, 0, &pl->wei_reorder, &pl->wei, &pl->wei_bytes)) != dnnl_success ||
        (s = make_reorder(cpu, &dst_user, dst_md, 1, &pl->dst_reorder, &pl->dst, &pl->dst_bytes)) != dnnl_success)
        goto fail;
    what = "memory objects";
    if ((s = dnnl_memory_create(&pl->user_src, &src_user, cpu->engine, DNNL_MEMORY_NONE)) != dnnl_success ||
        (s = dnnl_memory_create(&pl->user_wei, &wei_user, cpu->engine, DNNL_MEMORY_NONE)) != dnnl_success ||
        (s = dnnl_memory_create(&pl->user_dst, &dst_user, cpu->engine, DNNL_MEMORY_NONE)) != dnnl_success ||
        (s = dnnl_memory_create(&pl->bias, &bias_md, cpu->engine, DNNL_MEMORY_NONE)) != dnnl_success)
        goto fail;
    pl->pad_bytes = pad_md ? dnnl_memory_desc_get_size(pad_md) : 0;
    if (pl->pad_bytes && (s = dnnl_memory_create(&pl->pad, pad_md, cpu->engine, DNNL_MEMORY_NONE)) != dnnl_success)
        goto fail;
    dnnl_primitive_desc_destroy(pd);
    dnnl_primitive_attr_destroy(attr);
    *out = pl;
    return 0;
fail:
    if (pd)
        dnnl_primitive_desc_destroy(pd);
    if (attr)
        dnnl_primitive_attr_destroy(attr);
    plan_destroy(pl);
    db_cpu_dnnl_fail(c, s, what);
    return db_err_prefix(&c->err, "conv2d %dx%dx%dx%d -> %d, kernel %dx%d, stride %d, pad %d/%d", B, C, H, W, OC, KH,
                         KW, stride, pad0, pad1);
}

/* Reorder `from` into `to` with the given primitive. */
static dnnl_status_t run_reorder(db_cpu *cpu, dnnl_primitive_t r, dnnl_memory_t from, dnnl_memory_t to)
{
    dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, from}, {DNNL_ARG_TO, to}};
    return dnnl_primitive_execute(r, cpu->stream, 2, args);
}

static size_t round_page(size_t n) { return (n + 4095) & ~(size_t)4095; }

/* out (B, OC, HW) += bias per channel */
static void add_bias(db_ctx *c, float *out, const float *bias, int B, int OC, int HW)
{
#pragma omp parallel for num_threads(c->threads) schedule(static)
    for (int bo = 0; bo < B * OC; bo++) {
        const float a = bias[bo % OC];
        float *o = out + (size_t)bo * HW;
        for (int i = 0; i < HW; i++)
            o[i] += a;
    }
}

/* Small images: per image, col (C*KH*KW, OHW) = im2col(inp[b]), then
 * out[b] (OC, OHW) = weight (OC, C*KH*KW) @ col. */
static int conv_im2col(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B, int C,
                       int H, int W, int OC, int KH, int KW, int stride, int pad0, int OH, int OW)
{
    const int CKK = C * KH * KW, OHW = OH * OW;
    float *col = db_cpu_scratch(c, sizeof(float) * (size_t)CKK * OHW);
    if (!col)
        return db_err_prefix(&c->err, "conv2d");
    for (int b = 0; b < B; b++) {
        db_cpu_im2col(c, col, inp + (size_t)b * C * H * W, C, H, W, KH, KW, stride, pad0, OH, OW);
        if (db_cpu_sgemm_fixed(c, 1, 'N', 'N', OC, OHW, CKK, 1.0f, weight, CKK, 0, col, OHW, 0, 0.0f,
                               out + (size_t)b * OC * OHW, OHW, 0))
            return db_err_prefix(&c->err, "conv2d");
    }
    if (bias)
        add_bias(c, out, bias, B, OC, OHW);
    return 0;
}

static int conv1x1(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B, int C,
                   int HW, int OC)
{
    /* the weight (OC, C) is shared by every image: stride 0 */
    if (db_cpu_sgemm_fixed(c, B, 'N', 'N', OC, HW, C, 1.0f, weight, C, 0, inp, HW, (size_t)C * HW, 0.0f, out, HW,
                           (size_t)OC * HW))
        return db_err_prefix(&c->err, "conv2d 1x1");
    if (bias)
        add_bias(c, out, bias, B, OC, HW);
    return 0;
}

int db_cpu_conv2d_forward(db_ctx *c, float *out, const float *inp, const float *weight, const float *bias, int B,
                          int C, int H, int W, int OC, int KH, int KW, int stride, int pad0, int pad1)
{
    if (KH == 1 && KW == 1 && stride == 1 && pad0 == 0 && pad1 == 0)
        return conv1x1(c, out, inp, weight, bias, B, C, H * W, OC);
    const int OH = (H + pad0 + pad1 - KH) / stride + 1, OW = (W + pad0 + pad1 - KW) / stride + 1;
    if (OH * OW <= SMALL_HW)
        return conv_im2col(c, out, inp, weight, bias, B, C, H, W, OC, KH, KW, stride, pad0, OH, OW);
    db_cpu *cpu = c->cpu;
    const int64_t key[DB_CPU_KEYLEN] = {DB_CPU_KEY_CONV2D, B, C, H, W, OC, KH, KW, stride, pad0, pad1, bias != NULL};
    conv_plan *pl = db_cpu_cache_get(c, key);
    if (!pl) {
        if (plan_create(c, &pl, bias != NULL, B, C, H, W, OC, KH, KW, stride, pad0, pad1) != 0)
            return -1;
        if (db_cpu_cache_put(c, key, pl, plan_destroy) != 0)
            return -1;
    }

    char *buf = db_cpu_scratch(c, round_page(pl->src_bytes) + round_page(pl->wei_bytes) + round_page(pl->dst_bytes) +
                                      round_page(pl->pad_bytes));
    if (!buf)
        return db_err_prefix(&c->err, "conv2d");
    /* oneDNN takes non-const handles; it only reads inputs. */
    dnnl_memory_set_data_handle(pl->user_src, (void *)inp);
    dnnl_memory_set_data_handle(pl->user_wei, (void *)weight);
    dnnl_memory_set_data_handle(pl->user_dst, out);
    if (bias)
        dnnl_memory_set_data_handle(pl->bias, (void *)bias);
    dnnl_memory_t src = pl->user_src, wei = pl->user_wei, dst = pl->user_dst;
    if (pl->src) {
        dnnl_memory_set_data_handle(pl->src, buf);
        src = pl->src;
    }
    buf += round_page(pl->src_bytes);
    if (pl->wei) {
        dnnl_memory_set_data_handle(pl->wei, buf);
        wei = pl->wei;
    }
    buf += round_page(pl->wei_bytes);
    if (pl->dst) {
        dnnl_memory_set_data_handle(pl->dst, buf);
        dst = pl->dst;
    }
    buf += round_page(pl->dst_bytes);
    if (pl->pad)
        dnnl_memory_set_data_handle(pl->pad, buf);

    dnnl_status_t s = dnnl_success;
    const char *what = "source reorder";
    if (pl->src_reorder && (s = run_reorder(cpu, pl->src_reorder, pl->user_src, src)) != dnnl_success)
        goto fail;
    what = "weight reorder";
    if (pl->wei_reorder && (s = run_reorder(cpu, pl->wei_reorder, pl->user_wei, wei)) != dnnl_success)
        goto fail;
    dnnl_exec_arg_t args[5] = {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}};
    int nargs = 3;
    if (bias)
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_BIAS, pl->bias};
    if (pl->pad)
        args[nargs++] = (dnnl_exec_arg_t){DNNL_ARG_SCRATCHPAD, pl->pad};
    what = "convolution";
    if ((s = dnnl_primitive_execute(pl->conv, cpu->stream, nargs, args)) != dnnl_success)
        goto fail;
    what = "destination reorder";
    if (pl->dst_reorder && (s = run_reorder(cpu, pl->dst_reorder, dst, pl->user_dst)) != dnnl_success)
        goto fail;
    what = "stream wait";
    if ((s = dnnl_stream_wait(cpu->stream)) != dnnl_success)
        goto fail;
    return 0;
fail:
    db_cpu_dnnl_fail(c, s, what);
    return db_err_prefix(&c->err, "conv2d");
}
