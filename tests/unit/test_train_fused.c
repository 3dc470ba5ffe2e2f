/* The fused backward (train.h: db_train_opts.fused_backward; weights.h:
 * gradient units and sinks), on the tiny model with test_train.c's three
 * reference batches:
 *   - unit keys and spans: known answers, every tensor of the UNet and the
 *     text encoder in exactly one unit in every layout (diffusers folder,
 *     .ckpt), spans disjoint, an interleaved layout refused;
 *   - without clipping the fused steps give the plain steps' weights,
 *     moments and losses bit for bit (so every gradient element the
 *     windows held was the plain backward's), and the per-tensor norms
 *     recorded on the way are the plain gradients' norms;
 *   - with clipping, fused = a plain step clipping per tensor
 *     (clip_per_tensor), bit for bit, in fp32 AdamW, 8-bit AdamW, bf16,
 *     and with gradient checkpointing; per-tensor clipping is not the
 *     global clipping (it changes the weights);
 *   - two processes (a reduction that sums two identical halves): fused
 *     reduces unit by unit (one call per unit), plain once per component,
 *     same weights;
 *   - refused: gradient accumulation, fp16, a second micro-batch before the
 *     step;
 *   - memory: the window holds the largest unit, a fraction of the
 *     gradients it replaces (SD1.5's plan printed as a diagnostic). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/ops.h"
#include "libcommon/io/model.h"
#include "libcommon/io/safetensors.h"
#include "libcommon/io/tindex.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/train.h"
#include "libcommon/sd/unet.h"
#include "libcommon/sd/vae.h"
#include "libcommon/sd/weights.h"
#include "tap.h"

#define NREF TAP_TRAIN_REF_STEPS


static int same(const db_weights *a, const db_weights *b)
{
    return a && b && a->numel == b->numel && !memcmp(a->data, b->data, a->numel * sizeof(float));
}

static int same_q8(const db_q8_state *a, const db_q8_state *b)
{
    return a && b && a->ncodes == b->ncodes && a->nblocks == b->nblocks && a->nsmall == b->nsmall &&
           !memcmp(a->m_q, b->m_q, a->ncodes) && !memcmp(a->v_q, b->v_q, a->ncodes) &&
           !memcmp(a->m_absmax, b->m_absmax, a->nblocks * sizeof(float)) &&
           !memcmp(a->v_absmax, b->v_absmax, a->nblocks * sizeof(float)) &&
           !memcmp(a->m32, b->m32, a->nsmall * sizeof(float)) && !memcmp(a->v32, b->v32, a->nsmall * sizeof(float));
}

/* Everything a checkpoint would hold is bit-identical. */
static int same_state(db_trainer *a, db_trainer *b)
{
    db_train_state x, y;
    db_trainer_state(a, &x);
    db_trainer_state(b, &y);
    int ok = x.step == y.step && x.opt_step == y.opt_step && same(x.unet, y.unet) && same(x.text, y.text);
    if (x.unet_q8)
        ok = ok && same_q8(x.unet_q8, y.unet_q8) && (!x.text_q8 || same_q8(x.text_q8, y.text_q8));
    else
        ok = ok && same(x.unet_m, y.unet_m) && same(x.unet_v, y.unet_v) && (!x.text_m || (same(x.text_m, y.text_m) &&
                                                                                          same(x.text_v, y.text_v)));
    return ok;
}

/* ---- unit keys and spans ------------------------------------------------------------ */

static void test_keys(void)
{
    static const struct {
        int comp;
        const char *name, *key;
    } k[] = {
        {DB_COMP_UNET, "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.4.1"},
        {DB_COMP_UNET, "input_blocks.3.0.op.weight", "input_blocks.3.0"},
        {DB_COMP_UNET, "output_blocks.11.0.skip_connection.bias", "output_blocks.11.0"},
        {DB_COMP_UNET, "output_blocks.2.2.conv.weight", "output_blocks.2.2"},
        {DB_COMP_UNET, "middle_block.1.proj_in.weight", "middle_block.1"},
        {DB_COMP_UNET, "time_embed.2.bias", "time_embed"},
        {DB_COMP_UNET, "out.0.weight", "out"},
        {DB_COMP_UNET, "model.diffusion_model.out.2.bias", "model.diffusion_model.out"},
        {DB_COMP_TEXT, "text_model.encoder.layers.11.mlp.fc1.weight", "text_model.encoder.layers.11"},
        {DB_COMP_TEXT, "text_model.embeddings.token_embedding.weight", "text_model.embeddings"},
        {DB_COMP_TEXT, "text_model.final_layer_norm.bias", "text_model.final_layer_norm"},
    };
    int ok = 1;
    for (size_t i = 0; i < sizeof k / sizeof *k; i++) {
        const size_t l = db_grad_unit_key(k[i].comp, k[i].name);
        if (l != strlen(k[i].key) || strncmp(k[i].name, k[i].key, l)) {
            ok = 0;
            tap_diag("%s: key '%.*s', want '%s'", k[i].name, (int)l, k[i].name, k[i].key);
        }
    }
    tap_ok(ok, "unit keys of %zu names (blocks, samplers, head, time MLP, text layers; with the prefix)",
           sizeof k / sizeof *k);

    /* a layout where unit "a" holds unit "b"'s tensor between its own */
    db_weights w;
    memset(&w, 0, sizeof w);
    w.comp = DB_COMP_UNET;
    db_tindex_init(&w.ix);
    const char *names[] = {"input_blocks.1.0.a.weight", "input_blocks.1.1.b.weight", "input_blocks.1.0.c.weight"};
    db_err err = {0};
    for (int i = 0; i < 3; i++) {
        db_tentry e = {.name = names[i], .dtype = DB_F32, .ndim = 1, .shape = {20}, .offset = 32 * i,
                       .comp = DB_COMP_UNET};
        db_tindex_add(&w.ix, &e, &err);
    }
    w.n = w.ix.n, w.numel = 96;
    db_span sp = {0};
    const int rc = db_weights_span(&w, "input_blocks.1.0", &sp, &err);
    tap_ok(rc != 0 && err.code == DB_EUNSUPP && strstr(err.msg, "input_blocks.1.1.b.weight"),
           "an interleaved layout is refused, naming the stray tensor: %s", err.msg);
    db_err e2 = {0};
    const int rc2 = db_weights_span(&w, "input_blocks.1.1", &sp, &e2);
    tap_ok(rc2 == 0 && sp.lo == 32 && sp.hi == 64, "the inner unit's span [%zu, %zu) (20 floats padded to 32)",
           sp.lo, sp.hi);
    tap_ok(db_weights_span(&w, "input_blocks.2.0", &sp, &e2) != 0, "a unit with no tensor is refused: %s", e2.msg);
    db_tindex_free(&w.ix);
}

/* Every tensor of w in exactly one unit: walk the units' spans in order. */
static int check_cover(const db_weights *w, const char *what, size_t *nunits, size_t *largest)
{
    db_span *sp = calloc(w->ix.n, sizeof *sp);
    size_t nu = 0, big = 0;
    int ok = sp != NULL;
    char key[160];
    for (size_t i = 0; ok && i < w->ix.n; i++) {
        const char *name = w->ix.v[i].name;
        const size_t l = db_grad_unit_key(w->comp, name), off = (size_t)w->ix.v[i].offset;
        snprintf(key, sizeof key, "%.*s", (int)l, name);
        db_span s;
        db_err err = {0};
        if (!l || db_weights_span(w, key, &s, &err)) {
            tap_diag("%s: %s: %s", what, name, l ? err.msg : "in no unit");
            ok = 0;
            break;
        }
        ok = off >= s.lo && off < s.hi;
        if (nu == 0 || sp[nu - 1].lo != s.lo)
            sp[nu++] = s;
        big = s.hi - s.lo > big ? s.hi - s.lo : big;
    }
    /* spans met in layout order: disjoint and covering every float */
    for (size_t i = 0; ok && i < nu; i++)
        ok = sp[i].lo == (i ? sp[i - 1].hi : 0) && (i + 1 < nu || sp[i].hi == w->numel);
    free(sp);
    *nunits = nu, *largest = big;
    return ok;
}

static void test_cover(void)
{
    const char *layouts[] = {"tests/data/tiny/diffusers", "tests/data/tiny/tiny.ckpt"};
    for (int l = 0; l < 2; l++) {
        db_model m;
        db_err err = {0};
        if (!tap_ok(db_model_open(&m, tap_path(layouts[l]), NULL, &err) == 0, "open %s%s%s", layouts[l],
                    err.code ? ": " : "", err.msg))
            continue;
        const int comps[] = {DB_COMP_UNET, DB_COMP_TEXT};
        for (int c = 0; c < 2; c++) {
            db_weights w;
            if (db_weights_load(&w, &m, comps[c], &err)) {
                tap_ok(0, "load: %s", err.msg);
                continue;
            }
            size_t nu = 0, big = 0;
            const int ok = check_cover(&w, layouts[l], &nu, &big);
            const size_t win = db_weights_window_floats(&w);
            tap_ok(ok && win == big, "%s %s: %zu tensors in %zu units, disjoint, covering all %zu floats; window %zu "
                   "= the largest unit (%.0f %% of the gradients)", layouts[l], db_comp_name(comps[c]), w.ix.n, nu,
                   w.numel, win, 100.0 * (double)win / (double)w.numel);
            db_weights_free(&w);
        }
        db_model_close(&m);
    }
    /* SD1.5 by the plan: the window against the gradient buffers */
    db_arch a;
    db_err err = {0};
    db_train_device_plan p0, p1;
    if (db_arch_preset(&a, "sd15", &err) == 0) {
        const size_t t0 = db_unet_train_device_plan(&a, 2, 64, 64, 77, 1, 1, 0, 0, DB_PREC_BF16, &p0);
        const size_t t1 = db_unet_train_device_plan(&a, 2, 64, 64, 77, 1, 1, 1, 0, DB_PREC_BF16, &p1);
        tap_ok(t0 && t1 && p1.grads * 10 < p0.grads && p1.grads >= 49152000u * 4 && t1 < t0,
               "SD1.5 plan (bf16, text encoder, checkpointing): gradients %.0f MiB -> window %.0f MiB (the up path's "
               "ResBlock, 2560 -> 1280 channels), device %.0f -> %.0f MiB", p0.grads / 1048576.0,
               p1.grads / 1048576.0, t0 / 1048576.0, t1 / 1048576.0);
        /* validation samples (--validation-prompt): the VAE, its bf16 copy,
         * its 512x512 decode workspace (3 x 256 MiB + 2 x 8 MiB) */
        db_train_device_plan pv = p0, pg;
        const size_t tv = db_unet_validation_device_plan(&a, 64, 64, 0, DB_PREC_BF16, &pv);
        const size_t ws = db_vae_decode_bytes_arch(&a.vae, 64, 64);
        tap_ok(ws == 822083584u && tv == t0 + pv.validation && pv.validation > ws + 83653863u * 6 &&
                   pv.validation < ws + 83653863u * 6 + (64u << 20),
               "SD1.5 validation samples: decode workspace %zu bytes, %.0f MiB in all (bf16), device %.0f -> %.0f MiB",
               ws, pv.validation / 1048576.0, t0 / 1048576.0, tv / 1048576.0);
        db_unet_train_device_plan(&a, 2, 64, 64, 77, 1, 1, 0, 1, DB_PREC_BF16, &pg);
        const size_t g0 = pg.total, tg = db_unet_validation_device_plan(&a, 64, 64, 1, DB_PREC_BF16, &pg);
        tap_ok(tg - g0 == pv.validation + pg.convert + pg.conv_ws && db_unet_validation_device_plan(&a, 64, 64, 1,
                                                                                            DB_PREC_BF16, &pg) == tg,
               "  with graphs the sampling step's pool on top (%.0f MiB); counted once when asked twice",
               (pg.convert + pg.conv_ws) / 1048576.0);
    } else
        tap_ok(0, "sd15 preset: %s", err.msg);
}

/* ---- the trainer --------------------------------------------------------------------- */

typedef struct cfg {
    const char *name;
    double clip;
    int per_tensor_ref; /* the plain run clips per tensor */
    db_optim_kind opt;
    db_precision prec;
    int ckpt_fused;     /* the fused run checkpoints */
} cfg;

static db_train_opts opts_of(const cfg *c, int fused)
{
    db_train_opts o = db_train_opts_defaults(1e-3, NREF);
    o.train_text = 1;
    o.max_grad_norm = c->clip;
    o.optimizer = c->opt;
    o.fused_backward = fused;
    o.clip_per_tensor = !fused && c->per_tensor_ref;
    o.gradient_checkpointing = fused && c->ckpt_fused;
    return o;
}

static void test_equal(db_ctx *ctx, const db_model *m, const tap_train_ref *in, const cfg *c)
{
    db_err err = {0};
    db_trainer *tp = NULL, *tf = NULL;
    db_train_opts op = opts_of(c, 0), of = opts_of(c, 1);
    db_ctx_set_precision(ctx, c->prec);
    int rc = db_trainer_create(&tp, ctx, m, &op, &err);
    rc = rc ? rc : db_trainer_create(&tf, ctx, m, &of, &err);
    db_train_stats sp[NREF], sf[NREF];
    int losses = 1, ident = 1;
    double worst = 0;
    for (int k = 0; rc == 0 && k < NREF; k++) {
        rc = tap_train_ref_step(tp, in, k, &sp[k], &err);
        rc = rc ? rc : tap_train_ref_step(tf, in, k, &sf[k], &err);
        if (rc)
            break;
        losses &= sp[k].loss == sf[k].loss && sp[k].lr == sf[k].lr && sp[k].lr_text == sf[k].lr_text;
        const double rel = fabs(sf[k].grad_norm - sp[k].grad_norm) / sp[k].grad_norm;
        worst = rel > worst ? rel : worst;
        ident &= same_state(tp, tf);
        tap_diag("%s step %d: loss %.8f / %.8f, grad norm %.8f / %.8f", c->name, k + 1, sp[k].loss, sf[k].loss,
                 sp[k].grad_norm, sf[k].grad_norm);
    }
    if (tap_ok(rc == 0, "%s: %d plain and %d fused steps%s%s", c->name, NREF, NREF, rc ? ": " : "",
               rc ? err.msg : "")) {
        tap_ok(ident, "%s: weights and moments bit-identical after every step", c->name);
        tap_ok(losses, "%s: the same losses and learning rates", c->name);
        /* the global norm is summed over the units in backward order, the
         * plain one in table order: the same terms */
        tap_ok(worst < 1e-6, "%s: the same global gradient norm (rel %.1e)", c->name, worst);
    }
    db_trainer_free(tp);
    db_trainer_free(tf);
    db_ctx_set_precision(ctx, DB_PREC_F32);
}

/* The norms recorded by the fused step are the plain gradients'. */
static void test_norms(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    db_err err = {0};
    const cfg c = {"norms", 0, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    db_train_opts op = opts_of(&c, 0), of = opts_of(&c, 1);
    db_trainer *tp = NULL, *tf = NULL;
    int rc = db_trainer_create(&tp, ctx, m, &op, &err);
    rc = rc ? rc : db_trainer_create(&tf, ctx, m, &of, &err);
    const size_t n = rc ? 0 : db_trainer_grad_norms(tp, NULL, 0);
    double *a = calloc(n + 1, sizeof *a), *b = calloc(n + 1, sizeof *b);
    size_t nf = 0, bad = 0;
    if (rc == 0) {
        float *lat = malloc((size_t)in->B * in->C * in->H * in->W * sizeof *lat);
        const db_train_batch bt = tap_train_ref_batch(in, 0, lat);
        rc = db_trainer_accumulate(tp, &bt, NULL, &err);
        rc = rc ? rc : db_trainer_accumulate(tf, &bt, NULL, &err);
        if (rc == 0) {
            db_trainer_grad_norms(tp, a, n);
            nf = db_trainer_grad_norms(tf, b, n);
            for (size_t i = 0; i < n; i++)
                bad += (double)(float)a[i] != b[i];
        }
        /* a second micro-batch before the step */
        db_err e2 = {0};
        tap_ok(rc == 0 && db_trainer_accumulate(tf, &bt, NULL, &e2) != 0 && e2.code == DB_EUSAGE,
               "fused: a second micro-batch before the step is refused: %s", e2.msg);
        free(lat);
    }
    tap_ok(rc == 0 && nf == n && n > 0 && bad == 0, "the fused step's %zu per-tensor norms are the plain gradients' "
           "(float32 norms, as the clip computes them; %zu differ)%s%s", n, bad, rc ? ": " : "", rc ? err.msg : "");
    free(a), free(b);
    db_trainer_free(tp);
    db_trainer_free(tf);
}

/* Per-tensor clipping really differs from the global clip, and a huge
 * maximum is no clipping at all. */
static void test_per_tensor(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    db_err err = {0};
    const cfg cg = {"global", 0.05, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    const cfg ct = {"per tensor", 0.05, 1, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    const cfg c0 = {"none", 0, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    const cfg cb = {"huge", 1e30, 1, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    db_train_opts o[4] = {opts_of(&cg, 0), opts_of(&ct, 0), opts_of(&c0, 0), opts_of(&cb, 1)};
    db_trainer *t[4] = {0};
    int rc = 0;
    for (int i = 0; i < 4 && rc == 0; i++)
        rc = db_trainer_create(&t[i], ctx, m, &o[i], &err);
    db_train_stats s;
    for (int i = 0; i < 4 && rc == 0; i++)
        rc = tap_train_ref_step(t[i], in, 0, &s, &err);
    db_train_state a, b, c, d;
    if (rc == 0) {
        db_trainer_state(t[0], &a), db_trainer_state(t[1], &b), db_trainer_state(t[2], &c);
        db_trainer_state(t[3], &d);
    }
    tap_ok(rc == 0 && !same(a.unet, b.unet) && !same(b.unet, c.unet),
           "clipping each tensor to 0.05 gives other weights than the global clip and than none%s%s",
           rc ? ": " : "", rc ? err.msg : "");
    tap_ok(rc == 0 && same(c.unet, d.unet) && same(c.text, d.text),
           "a fused step with a maximum of 1e30 is the unclipped plain step");
    for (int i = 0; i < 4; i++)
        db_trainer_free(t[i]);
}

/* Two processes, each with the same micro-batch: the reduction doubles. */
typedef struct fake_world {
    int calls_f32, starts, waits;
} fake_world;
static int start_f32(void *u, float *x, size_t n, db_err *err)
{
    ((fake_world *)u)->starts++;
    for (size_t i = 0; i < n; i++)
        x[i] += x[i];
    return 0;
}
static int wait_all(void *u, db_err *err)
{
    ((fake_world *)u)->waits++;
    return 0;
}
static int twice_f32(void *u, float *x, size_t n, db_err *err)
{
    ((fake_world *)u)->calls_f32++;
    for (size_t i = 0; i < n; i++)
        x[i] += x[i];
    return 0;
}
static int twice_f64(void *u, double *x, size_t n, db_err *err)
{
    for (size_t i = 0; i < n; i++)
        x[i] += x[i];
    return 0;
}

static void test_world(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    db_err err = {0};
    fake_world wp = {0}, wf = {0};
    const cfg c = {"world", 0, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    db_train_opts op = opts_of(&c, 0), of = opts_of(&c, 1);
    op.world = of.world = 2;
    op.reduce_f32 = of.reduce_f32 = twice_f32;
    op.reduce_f64 = of.reduce_f64 = twice_f64;
    op.reduce_user = &wp, of.reduce_user = &wf;
    db_trainer *tp = NULL, *tf = NULL;
    int rc = db_trainer_create(&tp, ctx, m, &op, &err);
    rc = rc ? rc : db_trainer_create(&tf, ctx, m, &of, &err);
    db_train_stats sp, sf;
    rc = rc ? rc : tap_train_ref_step(tp, in, 0, &sp, &err);
    rc = rc ? rc : tap_train_ref_step(tf, in, 0, &sf, &err);
    tap_ok(rc == 0 && same_state(tp, tf) && sp.loss == sf.loss,
           "two processes: fused = plain, bit for bit (loss %.8f)%s%s", sf.loss, rc ? ": " : "", rc ? err.msg : "");
    tap_ok(rc == 0 && wp.calls_f32 == 2 && wf.calls_f32 > 10,
           "the plain step sums each component's gradients once (%d calls), the fused one unit by unit (%d)",
           wp.calls_f32, wf.calls_f32);

    /* bucketed: the plain step begins each unit's sum in the backward */
    fake_world wb = {0};
    db_train_opts ob = op;
    ob.reduce_f32_start = start_f32, ob.reduce_wait = wait_all, ob.reduce_user = &wb;
    ob.grad_accum = 2; /* the sums begin in the second micro-batch only */
    db_trainer *tb = NULL, *ta = NULL;
    fake_world wa = {0};
    db_train_opts oa = op;
    oa.grad_accum = 2, oa.reduce_user = &wa;
    db_train_stats sb, sa;
    int r2 = db_trainer_create(&tb, ctx, m, &ob, &err);
    r2 = r2 ? r2 : db_trainer_create(&ta, ctx, m, &oa, &err);
    float *lat = malloc((size_t)in->B * in->C * in->H * in->W * sizeof *lat);
    const db_train_batch bt = tap_train_ref_batch(in, 0, lat);
    int starts_after_first = -1;
    for (int k = 0; r2 == 0 && k < 2; k++) {
        r2 = db_trainer_accumulate(tb, &bt, NULL, &err);
        r2 = r2 ? r2 : db_trainer_accumulate(ta, &bt, NULL, &err);
        if (k == 0)
            starts_after_first = wb.starts;
    }
    db_err e3 = {0};
    const int refused = r2 == 0 && db_trainer_accumulate(tb, &bt, NULL, &e3) != 0 && e3.code == DB_EUSAGE;
    r2 = r2 ? r2 : db_trainer_apply(tb, &sb, &err);
    r2 = r2 ? r2 : db_trainer_apply(ta, &sa, &err);
    tap_ok(r2 == 0 && same_state(tb, ta) && sb.loss == sa.loss && sb.grad_norm == sa.grad_norm,
           "bucketed sums: the same step as one sum per component, bit for bit%s%s", r2 ? ": " : "",
           r2 ? err.msg : "");
    tap_ok(starts_after_first == 0 && wb.starts == wf.calls_f32 && wb.waits == 1 && wb.calls_f32 == 0 &&
               wa.calls_f32 == 2,
           "begun unit by unit in the last micro-batch only (%d after the first, %d in all), one wait, no "
           "whole-buffer sum", starts_after_first, wb.starts);
    tap_ok(refused, "a micro-batch after the sums began is refused: %s", e3.msg);
    free(lat);
    db_trainer_free(tb);
    db_trainer_free(ta);
    db_trainer_free(tp);
    db_trainer_free(tf);
}

/* A gradient that is not finite while the loss is: the fused step's
 * per-tensor norms come back from the device after the backward (train.c
 * fused_norms), and a non-finite one ends the step as divergence, naming
 * its tensor; the step is not counted.  The NaN comes in through a
 * two-process reduction that poisons the third unit's sum. */
static int poison_f32(void *u, float *x, size_t n, db_err *err)
{
    if (++((fake_world *)u)->calls_f32 == 3 && n)
        x[n / 2] = NAN;
    return 0;
}
static int same_f64(void *u, double *x, size_t n, db_err *err) { return 0; }

static void test_diverged(db_ctx *ctx, const db_model *m, const tap_train_ref *in)
{
    const cfg c = {"diverged", 1.0, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    db_train_opts o = opts_of(&c, 1);
    fake_world w = {0};
    o.world = 2, o.reduce_f32 = poison_f32, o.reduce_f64 = same_f64, o.reduce_user = &w;
    db_trainer *t = NULL;
    db_err err = {0};
    int rc = db_trainer_create(&t, ctx, m, &o, &err);
    float *lat = malloc((size_t)in->B * in->C * in->H * in->W * sizeof *lat);
    if (rc == 0) {
        const db_train_batch bt = tap_train_ref_batch(in, 0, lat);
        rc = db_trainer_accumulate(t, &bt, NULL, &err);
    }
    db_train_state st = {0};
    if (t)
        db_trainer_state(t, &st);
    tap_ok(rc != 0 && err.code == DB_ENUMERIC && strstr(err.msg, "diverged") && strstr(err.msg, "the gradient of ") &&
               w.calls_f32 > 3 && st.step == 0,
           "fused: a NaN gradient (finite loss) ends the step as divergence after the backward (%d units), naming "
           "its tensor: %s", w.calls_f32, err.msg);
    free(lat);
    db_trainer_free(t);
}

static void test_refused(db_ctx *ctx, const db_model *m)
{
    const cfg c = {"refused", 1.0, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0};
    db_train_opts o = opts_of(&c, 1);
    o.grad_accum = 2;
    db_trainer *t = NULL;
    db_err err = {0};
    tap_ok(db_trainer_create(&t, ctx, m, &o, &err) != 0 && err.code == DB_EUSAGE && !t,
           "fused with gradient accumulation is refused: %s", err.msg);
    o.grad_accum = 1;
    db_ctx_set_precision(ctx, DB_PREC_F16);
    db_err e2 = {0};
    tap_ok(db_trainer_create(&t, ctx, m, &o, &e2) != 0 && e2.code == DB_EUSAGE && !t,
           "fused in fp16 is refused: %s", e2.msg);
    db_ctx_set_precision(ctx, DB_PREC_F32);
}

int main(void)
{
    db_err err = {0};
    db_ctx *ctx = NULL;
    if (!tap_ok(db_ctx_create(&ctx, DB_CPU, 0, &err) == 0, "cpu context%s%s", err.code ? ": " : "", err.msg))
        return tap_done();
    test_keys();
    test_cover();
    static tap_train_fix fx;
    if (tap_train_fix_open(&fx))
        return tap_done();
    const tap_train_ref *in = &fx.in;
    db_model *m = &fx.m;
    const cfg cases[] = {
        {"fp32, no clipping", 0, 0, DB_OPTIM_ADAMW, DB_PREC_F32, 0},
        {"fp32, clip 1.0 per tensor", 1.0, 1, DB_OPTIM_ADAMW, DB_PREC_F32, 0},
        {"fp32, clip 0.05 per tensor", 0.05, 1, DB_OPTIM_ADAMW, DB_PREC_F32, 0},
        {"adamw8bit, clip 0.05 per tensor", 0.05, 1, DB_OPTIM_ADAMW8BIT, DB_PREC_F32, 0},
        {"bf16, clip 0.05 per tensor", 0.05, 1, DB_OPTIM_ADAMW, DB_PREC_BF16, 0},
        {"fp32, clip 0.05, fused with checkpointing", 0.05, 1, DB_OPTIM_ADAMW, DB_PREC_F32, 1},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++)
        test_equal(ctx, m, in, &cases[i]);
    test_norms(ctx, m, in);
    test_per_tensor(ctx, m, in);
    test_world(ctx, m, in);
    test_diverged(ctx, m, in);
    test_refused(ctx, m);
    tap_train_fix_close(&fx);
    db_ctx_destroy(ctx);
    return tap_done();
}
