/* Architecture: the generated tensor table against real SD1.5 and tiny-dev
 * name/shape lists (both layouts), configs in and out, detection from
 * single-file shapes with its error messages, legacy VAE names, and the
 * deterministic initialiser. */
#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/io/tindex.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/init.h"
#include "tap.h"

static json_t *load(const char *rel)
{
    json_error_t je;
    json_t *j = json_load_file(tap_path(rel), 0, &je);
    if (!j)
        tap_diag("%s: %s (line %d)", rel, je.text, je.line);
    return j;
}

static int shape_of(const json_t *a, int64_t *s)
{
    int n = (int)json_array_size(a);
    for (int i = 0; i < n && i < 4; i++)
        s[i] = json_integer_value(json_array_get(a, (size_t)i));
    return n;
}

/* "comp|diffusers|compvis|dshape|cshape": one row of the key lists. */
static char *row_key(const char *comp, const char *df, const char *cv, int dn, const int64_t *ds, int cn,
                     const int64_t *cs)
{
    char a[96], b[96];
    char *s = malloc(512);
    snprintf(s, 512, "%s|%s|%s|%s|%s", comp, df, cv, db_shape_str(a, sizeof a, dn, ds),
             db_shape_str(b, sizeof b, cn, cs));
    return s;
}

static int cmpstr(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The table equals the rows as a set; diagnoses the first difference. */
static int table_matches(const db_tname *v, size_t n, const json_t *rows)
{
    size_t m = json_array_size(rows);
    char **a = calloc(n, sizeof *a), **b = calloc(m, sizeof *b);
    for (size_t i = 0; i < n; i++)
        a[i] = row_key(db_comp_name(v[i].comp), v[i].diffusers, v[i].compvis, v[i].diff_ndim, v[i].diff_shape,
                       v[i].ndim, v[i].shape);
    for (size_t i = 0; i < m; i++) {
        const json_t *r = json_array_get(rows, i);
        int64_t ds[4], cs[4];
        int dn = shape_of(json_object_get(r, "diffusers_shape"), ds);
        int cn = shape_of(json_object_get(r, "compvis_shape"), cs);
        b[i] = row_key(json_string_value(json_object_get(r, "component")),
                       json_string_value(json_object_get(r, "diffusers")),
                       json_string_value(json_object_get(r, "compvis")), dn, ds, cn, cs);
    }
    qsort(a, n, sizeof *a, cmpstr);
    qsort(b, m, sizeof *b, cmpstr);
    int ok = n == m;
    if (!ok)
        tap_diag("table has %zu rows, reference %zu", n, m);
    for (size_t i = 0, j = 0; i < n || j < m; i++, j++) {
        int c = i == n ? 1 : j == m ? -1 : strcmp(a[i], b[j]);
        if (c) { /* one difference is enough to read */
            tap_diag("%s: %s", c < 0 ? "only in table" : "only in reference", c < 0 ? a[i] : b[j]);
            ok = 0;
            break;
        }
    }
    for (size_t k = 0; k < n; k++)
        free(a[k]);
    for (size_t k = 0; k < m; k++)
        free(b[k]);
    free(a);
    free(b);
    return ok;
}

static int unique_names(const db_tname *v, size_t n)
{
    /* CompVis names carry a prefix; diffusers ones get "comp/" so that all
     * 2n strings share one namespace */
    char **a = malloc(2 * n * sizeof *a);
    for (size_t i = 0; i < n; i++) {
        a[2 * i] = strdup(v[i].compvis);
        a[2 * i + 1] = malloc(200);
        snprintf(a[2 * i + 1], 200, "%s/%s", db_comp_name(v[i].comp), v[i].diffusers);
    }
    qsort(a, 2 * n, sizeof *a, cmpstr);
    int ok = 1;
    for (size_t i = 1; i < 2 * n; i++)
        ok &= strcmp(a[i], a[i - 1]) != 0;
    for (size_t i = 0; i < 2 * n; i++)
        free(a[i]);
    free(a);
    return ok;
}

static int configs(db_arch *a, const char *dir)
{
    char p[3][256];
    const char *c[3] = {"unet", "vae", "text_encoder"};
    json_t *j[3];
    for (int i = 0; i < 3; i++) {
        snprintf(p[i], sizeof p[i], "%s/%s/config.json", dir, c[i]);
        j[i] = load(p[i]);
    }
    db_err err;
    memset(a, 0, sizeof *a);
    int rc = db_arch_from_config(a, j[0], j[1], j[2], &err);
    if (rc)
        tap_diag("%s", err.msg);
    for (int i = 0; i < 3; i++)
        json_decref(j[i]);
    return rc;
}

static void test_tables(void)
{
    db_arch a, b;
    db_err err;
    db_tname *v = NULL;
    size_t n = 0;
    char why[256];

    json_t *sd = load("tests/data/sd15-keys/diffusers_to_compvis.json");
    json_t *tiny = load("tests/data/tiny/keys.json");

    tap_ok(!db_arch_preset(&a, "sd15", &err) && !db_arch_names(&a, &v, &n, &err), "sd15 table generated");
    tap_ok(n == 1131, "sd15 table has 1131 tensors (%zu)", n);
    tap_ok(sd && table_matches(v, n, sd), "sd15 table == diffusers_to_compvis.json (names both ways, both shapes)");
    tap_ok(unique_names(v, n), "sd15 names are unique in both layouts");
    size_t counts[DB_NCOMP] = {0};
    int prefix_ok = 1;
    for (size_t i = 0; i < n; i++) {
        counts[v[i].comp]++;
        prefix_ok &= db_comp_of_compvis(v[i].compvis) == v[i].comp;
    }
    tap_ok(counts[0] == 686 && counts[1] == 248 && counts[2] == 197, "sd15 per component 686/248/197");
    tap_ok(prefix_ok, "db_comp_of_compvis agrees with every row");
    /* init kinds and fan-in on a few known rows */
    int kinds_ok = 1;
    for (size_t i = 0; i < n; i++) {
        const db_tname *t = &v[i];
        if (!strcmp(t->compvis, "model.diffusion_model.input_blocks.0.0.weight"))
            kinds_ok &= t->init == DB_INIT_CONV_W && t->fan_in == 4 * 9;
        if (!strcmp(t->compvis, "model.diffusion_model.time_embed.0.bias"))
            kinds_ok &= t->init == DB_INIT_LINEAR_B && t->fan_in == 320;
        if (!strcmp(t->compvis, "first_stage_model.encoder.mid.attn_1.q.weight"))
            kinds_ok &= t->init == DB_INIT_LINEAR_W && t->fan_in == 512;
        if (strstr(t->compvis, "norm") && strstr(t->compvis, ".weight"))
            kinds_ok &= t->init == DB_INIT_ONE;
        if (!strcmp(t->compvis, "cond_stage_model.transformer.text_model.embeddings.position_ids"))
            kinds_ok &= t->init == DB_INIT_POSITION_IDS;
        if (!strcmp(t->compvis, "cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight"))
            kinds_ok &= t->init == DB_INIT_NORMAL && fabs(t->init_std - 1 / sqrt(1536.0)) < 1e-7;
    }
    tap_ok(kinds_ok, "init kinds and fan_in on sample rows");
    free(v);

    tap_ok(!db_arch_preset(&b, "tiny", &err) && !db_arch_names(&b, &v, &n, &err), "tiny table generated");
    tap_ok(n == 965, "tiny table has 965 tensors (%zu)", n);
    tap_ok(tiny && table_matches(v, n, tiny), "tiny table == tiny-dev keys.json");
    free(v);
    tap_ok(db_arch_preset(&b, "sd99", &err) && strstr(err.msg, "sd99"), "unknown preset refused: %s", err.msg);

    /* configs give the presets */
    db_arch c;
    db_arch_preset(&a, "sd15", &err);
    tap_ok(!configs(&c, "tests/data/sd15-keys/configs") && db_arch_equal(&a, &c, DB_COMP_ALL, why, sizeof why),
           "SD1.5 configs == sd15 preset %s", why);
    db_arch_preset(&a, "tiny", &err);
    tap_ok(!configs(&c, "tests/data/tiny/diffusers") && db_arch_equal(&a, &c, DB_COMP_ALL, why, sizeof why),
           "tiny configs == tiny preset %s", why);

    /* to_config -> from_config is the identity */
    const char *presets[2] = {"sd15", "tiny"};
    for (int p = 0; p < 2; p++) {
        db_arch_preset(&a, presets[p], &err);
        json_t *j[3];
        for (int k = 0; k < 3; k++)
            j[k] = db_arch_to_config(&a, k);
        memset(&c, 0, sizeof c);
        int rc = db_arch_from_config(&c, j[0], j[1], j[2], &err);
        tap_ok(!rc && db_arch_equal(&a, &c, DB_COMP_ALL, why, sizeof why), "%s: to_config/from_config round trip %s",
               presets[p], rc ? err.msg : why);
        json_t *cls = json_object_get(j[0], "_class_name");
        json_t *arch = json_array_get(json_object_get(j[2], "architectures"), 0);
        tap_ok(cls && !strcmp(json_string_value(cls), "UNet2DConditionModel") && arch &&
                   !strcmp(json_string_value(arch), "CLIPTextModel") &&
                   !strcmp(json_string_value(json_object_get(j[2], "model_type")), "clip_text_model") &&
                   json_integer_value(json_object_get(j[2], "eos_token_id")) == 2 &&
                   json_integer_value(json_object_get(j[2], "pad_token_id")) == 1,
               "%s: configs carry class names, model_type and token ids", presets[p]);
        for (int k = 0; k < 3; k++)
            json_decref(j[k]);
    }
    json_decref(sd);
    json_decref(tiny);
}

/* A tiny UNet config with one key changed must be refused naming the key. */
static void refused(const char *comp, const char *key, json_t *val)
{
    char path[128];
    snprintf(path, sizeof path, "tests/data/tiny/diffusers/%s/config.json", comp);
    json_t *o = load(path);
    json_object_set_new(o, key, val);
    db_arch a;
    db_err err = {0};
    db_arch_preset(&a, "tiny", &err);
    int isunet = !strcmp(comp, "unet"), isvae = !strcmp(comp, "vae");
    int rc = db_arch_from_config(&a, isunet ? o : NULL, isvae ? o : NULL, !isunet && !isvae ? o : NULL, &err);
    tap_ok(rc && strstr(err.msg, key), "%s config %s refused: %s", comp, key, rc ? err.msg : "(accepted)");
    json_decref(o);
}

static void test_configs(void)
{
    refused("unet", "class_embed_type", json_string("timestep"));
    refused("unet", "addition_embed_type", json_string("text_time"));
    refused("unet", "time_cond_proj_dim", json_integer(256));
    refused("unet", "resnet_time_scale_shift", json_string("scale_shift"));
    refused("unet", "conv_in_kernel", json_integer(7));
    refused("unet", "attention_type", json_string("gated"));
    refused("unet", "dual_cross_attention", json_true());
    refused("unet", "only_cross_attention", json_true());
    refused("unet", "mid_block_type", json_string("UNetMidBlock2DSimpleCrossAttn"));
    refused("unet", "mid_block_type", json_null());
    refused("unet", "down_block_types", json_pack("[ssss]", "CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D",
                                                  "CrossAttnDownBlock2D", "DownBlock2D"));
    refused("unet", "norm_num_groups", json_integer(24));
    refused("unet", "block_out_channels", json_pack("[iii]", 32, 64, 64));
    refused("unet", "attention_head_dim", json_integer(5));
    refused("vae", "act_fn", json_string("gelu"));
    refused("vae", "norm_num_groups", json_integer(24));
    refused("text_encoder", "hidden_act", json_string("relu"));
    refused("text_encoder", "model_type", json_string("clip"));
    refused("text_encoder", "num_attention_heads", json_integer(5));

    /* heads: attention_head_dim is the number of heads for SD1 (int or a
     * list); num_attention_heads wins when given */
    json_t *o = load("tests/data/tiny/diffusers/unet/config.json");
    db_arch a;
    db_err err;
    db_arch_preset(&a, "tiny", &err);
    json_object_set_new(o, "attention_head_dim", json_pack("[iiii]", 2, 4, 8, 16));
    int rc = db_arch_from_config(&a, o, NULL, NULL, &err);
    tap_ok(!rc && a.unet.heads[0] == 2 && a.unet.heads[3] == 16, "attention_head_dim list read per level");
    json_object_set_new(o, "num_attention_heads", json_integer(4));
    rc = db_arch_from_config(&a, o, NULL, NULL, &err);
    tap_ok(!rc && a.unet.heads[0] == 4 && a.unet.heads[3] == 4, "num_attention_heads honoured");
    json_t *j = db_arch_to_config(&a, DB_COMP_UNET);
    tap_ok(json_integer_value(json_object_get(j, "attention_head_dim")) == 4, "to_config writes heads as attention_head_dim");
    json_decref(j);
    /* SD2-style options are read */
    json_object_set_new(o, "use_linear_projection", json_true());
    json_object_set_new(o, "cross_attention_dim", json_integer(48));
    json_object_set_new(o, "transformer_layers_per_block", json_integer(2));
    rc = db_arch_from_config(&a, o, NULL, NULL, &err);
    tap_ok(!rc && a.unet.use_linear_projection && a.unet.context_dim == 48 && a.unet.transformer_depth == 2,
           "use_linear_projection, cross_attention_dim, transformer_layers_per_block read");
    json_decref(o);
    /* a failed load leaves the arch untouched */
    db_arch before = a;
    o = load("tests/data/tiny/diffusers/vae/config.json");
    json_object_set_new(o, "latent_channels", json_string("four"));
    rc = db_arch_from_config(&a, NULL, o, NULL, &err);
    tap_ok(rc && !memcmp(&a, &before, sizeof a) && strstr(err.msg, "latent_channels"),
           "bad value refused, arch unchanged: %s", err.msg);
    json_decref(o);
    /* one component into an otherwise empty arch: only that one is validated */
    db_arch z;
    memset(&z, 0, sizeof z);
    o = load("tests/data/tiny/diffusers/unet/config.json");
    rc = db_arch_from_config(&z, o, NULL, NULL, &err);
    tap_ok(!rc && z.unet.block_out[1] == 64 && z.vae.nlevels == 0, "one config into an empty arch %s",
           rc ? err.msg : "");
    json_decref(o);
    /* SD1.5's old VAE config has no scaling_factor: the default */
    o = load("tests/data/sd15-keys/configs/vae/config.json");
    rc = db_arch_from_config(&a, NULL, o, NULL, &err);
    tap_ok(!rc && a.vae.scaling_factor == 0.18215, "missing scaling_factor defaults to 0.18215");
    json_decref(o);
}

/* An index of CompVis names and shapes (no data) from a key list, leaving
 * out the tensors whose names contain `skip` (when not NULL). */
static void index_from(db_tindex *ix, const json_t *rows, const char *skip)
{
    db_tindex_init(ix);
    db_err err;
    for (size_t i = 0; i < json_array_size(rows); i++) {
        const json_t *r = json_array_get(rows, i);
        db_tentry e;
        memset(&e, 0, sizeof e);
        e.name = json_string_value(json_object_get(r, "compvis"));
        if (skip && strstr(e.name, skip))
            continue;
        e.ndim = shape_of(json_object_get(r, "compvis_shape"), e.shape);
        e.dtype = strstr(e.name, "position_ids") ? DB_I64 : DB_F16;
        e.comp = db_comp_of_compvis(e.name);
        if (db_tindex_add(ix, &e, &err))
            tap_diag("%s", err.msg);
    }
}

static void set_shape(db_tindex *ix, const char *name, int ndim, int64_t a, int64_t b, int64_t c, int64_t d)
{
    long i = db_tindex_find(ix, name);
    if (i < 0) {
        tap_diag("no tensor %s", name);
        return;
    }
    int64_t s[4] = {a, b, c, d};
    ix->v[i].ndim = ndim;
    memcpy(ix->v[i].shape, s, sizeof s);
}

static void test_detect(void)
{
    json_t *sd = load("tests/data/sd15-keys/diffusers_to_compvis.json");
    json_t *tiny = load("tests/data/tiny/keys.json");
    db_arch want, got;
    db_err err;
    char why[256];
    db_tindex ix;

    index_from(&ix, sd, NULL);
    db_arch_preset(&want, "sd15", &err);
    int rc = db_arch_detect(&got, &ix, &err);
    tap_ok(!rc && db_arch_equal(&want, &got, DB_COMP_ALL, why, sizeof why), "sd15 single file detected as sd15 %s",
           rc ? err.msg : why);
    rc = db_arch_check_tensors(&want, &ix, DB_COMP_ALL, &err);
    tap_ok(!rc, "sd15 file passes the sd15 tensor check");

    /* VAE attention stored as linears (diffusers-shaped) is accepted */
    set_shape(&ix, "first_stage_model.decoder.mid.attn_1.q.weight", 2, 512, 512, 0, 0);
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(!rc, "VAE mid attention [512, 512] accepted %s", rc ? err.msg : "");

    /* a wrong shape is named with both shapes */
    set_shape(&ix, "model.diffusion_model.input_blocks.4.0.in_layers.2.weight", 4, 320, 320, 3, 3);
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(rc && strstr(err.msg, "tensor 'model.diffusion_model.input_blocks.4.0.in_layers.2.weight': shape "
                                 "[320, 320, 3, 3] but the detected architecture needs [640, 320, 3, 3]"),
           "bad shape named: %s", err.msg);
    set_shape(&ix, "model.diffusion_model.input_blocks.4.0.in_layers.2.weight", 4, 640, 320, 3, 3);
    set_shape(&ix, "cond_stage_model.transformer.text_model.encoder.layers.5.mlp.fc2.weight", 2, 768, 3000, 0, 0);
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(rc && strstr(err.msg, "layers.5.mlp.fc2.weight': shape [768, 3000] but the detected architecture needs [768, 3072]"),
           "bad text shape named: %s", err.msg);
    db_tindex_free(&ix);

    /* unknown extra tensors are fine */
    index_from(&ix, sd, NULL);
    db_tentry extra;
    memset(&extra, 0, sizeof extra);
    extra.name = "model_ema.decay";
    extra.dtype = DB_F32;
    db_tindex_add(&ix, &extra, &err);
    extra.name = "model.diffusion_model.some_new_thing.weight";
    extra.ndim = 1;
    extra.shape[0] = 3;
    db_tindex_add(&ix, &extra, &err);
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(!rc, "unknown names are not an error %s", rc ? err.msg : "");
    db_tindex_free(&ix);
    /* a missing tensor is named */
    index_from(&ix, sd, "first_stage_model.decoder.up.2.block.1.norm2.bias");
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(rc && strstr(err.msg, "missing tensor 'first_stage_model.decoder.up.2.block.1.norm2.bias'"),
           "missing tensor named: %s", err.msg);
    db_tindex_free(&ix);

    /* a component entirely missing is named; the others can still be detected */
    index_from(&ix, sd, "first_stage_model.");
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(rc && strstr(err.msg, "VAE") && strstr(err.msg, "first_stage_model."), "missing VAE named: %s", err.msg);
    db_arch_preset(&got, "tiny", &err);
    rc = db_arch_detect_comps(&got, &ix, DB_COMP_BIT(DB_COMP_UNET) | DB_COMP_BIT(DB_COMP_TEXT), &err);
    tap_ok(!rc && db_arch_equal(&want, &got, DB_COMP_BIT(DB_COMP_UNET) | DB_COMP_BIT(DB_COMP_TEXT), why, sizeof why) &&
               got.vae.block_out[0] == 32,
           "detect_comps detects UNet + text only, leaves the VAE %s", rc ? err.msg : why);
    db_tindex_free(&ix);

    /* tiny: everything detectable; sample sizes are not in the weights */
    index_from(&ix, tiny, NULL);
    db_arch_preset(&want, "tiny", &err);
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(!rc && got.unet.sample_size == 64 && got.vae.sample_size == 512, "tiny detected (sample sizes default) %s",
           rc ? err.msg : "");
    got.unet.sample_size = want.unet.sample_size;
    got.vae.sample_size = want.vae.sample_size;
    tap_ok(!rc && db_arch_equal(&want, &got, DB_COMP_ALL, why, sizeof why), "tiny single file detected as tiny %s", why);
    db_tindex_free(&ix);
    /* without position_ids (transformers >= 4.31 files) */
    index_from(&ix, tiny, "position_ids");
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(!rc && !got.text.has_position_ids, "no position_ids detected %s", rc ? err.msg : "");
    db_tindex_free(&ix);

    /* an SD2-style UNet (linear projections, 1024 context, 64-wide heads) */
    db_arch sd2;
    db_arch_preset(&sd2, "sd15", &err);
    sd2.unet.use_linear_projection = 1;
    sd2.unet.context_dim = 1024;
    for (int i = 0; i < 4; i++)
        sd2.unet.heads[i] = sd2.unet.block_out[i] / 64;
    db_tname *v;
    size_t n;
    db_arch_names(&sd2, &v, &n, &err);
    db_tindex_init(&ix);
    for (size_t i = 0; i < n; i++) {
        db_tentry e;
        memset(&e, 0, sizeof e);
        e.name = v[i].compvis;
        e.ndim = v[i].ndim;
        memcpy(e.shape, v[i].shape, sizeof v[i].shape);
        db_tindex_add(&ix, &e, &err);
    }
    rc = db_arch_detect(&got, &ix, &err);
    tap_ok(!rc && db_arch_equal(&sd2, &got, DB_COMP_ALL, why, sizeof why), "SD2-style UNet detected %s",
           rc ? err.msg : why);
    free(v);
    db_tindex_free(&ix);

    json_decref(sd);
    json_decref(tiny);
}

static void test_legacy(void)
{
    json_t *old = load("tests/data/sd15-keys/diffusers_vae_legacy_names.json");
    db_arch a;
    db_err err;
    db_tname *v;
    size_t n;
    db_arch_preset(&a, "sd15", &err);
    db_arch_names(&a, &v, &n, &err);
    size_t renamed = 0, found = 0;
    for (size_t i = 0; i < json_array_size(old); i++) {
        const char *name = json_string_value(json_object_get(json_array_get(old, i), "name"));
        char buf[160];
        const char *cur = db_vae_legacy_name(name, buf, sizeof buf);
        renamed += cur != NULL;
        if (!cur)
            cur = name;
        for (size_t j = 0; j < n; j++)
            if (v[j].comp == DB_COMP_VAE && !strcmp(v[j].diffusers, cur)) {
                found++;
                break;
            }
    }
    tap_ok(json_array_size(old) == 248 && found == 248, "every legacy VAE name maps to a table name (%zu/248)", found);
    tap_ok(renamed == 16, "16 legacy attention names renamed (%zu)", renamed);
    char buf[160];
    const char *r = db_vae_legacy_name("decoder.mid_block.attentions.0.proj_attn.bias", buf, sizeof buf);
    tap_ok(r && !strcmp(r, "decoder.mid_block.attentions.0.to_out.0.bias"), "proj_attn -> to_out.0");
    tap_ok(!db_vae_legacy_name("decoder.mid_block.attentions.0.to_q.weight", buf, sizeof buf) &&
               !db_vae_legacy_name("encoder.conv_in.weight", buf, sizeof buf) &&
               !db_vae_legacy_name("decoder.mid_block.attentions.0.query.weight.x", buf, sizeof buf) &&
               !db_vae_legacy_name("encoder.mid_block.attentions.0.query.weight", buf, 10),
           "current names, near misses and short buffers give NULL");
    tap_ok(!strcmp(db_comp_name(DB_COMP_TEXT), "text_encoder") && !db_comp_name(7) &&
               !strcmp(db_comp_prefix(DB_COMP_VAE), "first_stage_model.") &&
               db_comp_of_compvis("model_ema.decay") == -1 &&
               db_comp_of_compvis("cond_stage_model.transformer.text_model.x") == DB_COMP_TEXT,
           "component names and prefixes");
    free(v);
    json_decref(old);
}

static void test_init(void)
{
    /* Random123's known-answer vectors for Philox4x32-10 */
    uint32_t out[4];
    const uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0};
    db_philox4x32(c0, k0, out);
    tap_ok(out[0] == 0x6627e8d5 && out[1] == 0xe169c58d && out[2] == 0xbc57ac4c && out[3] == 0x9b00dbd8,
           "philox4x32-10 KAT zero");
    const uint32_t c1[4] = {0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, k1[2] = {0xa4093822, 0x299f31d0};
    db_philox4x32(c1, k1, out);
    tap_ok(out[0] == 0xd16cfe09 && out[1] == 0x94fdcceb && out[2] == 0x5001e420 && out[3] == 0x24126ea1,
           "philox4x32-10 KAT pi");

    db_arch a;
    db_err err;
    db_tname *v;
    size_t n;
    db_arch_preset(&a, "tiny", &err);
    db_arch_names(&a, &v, &n, &err);
    int bounds_ok = 1, const_ok = 1, stats_ok = 1, det_ok = 1, split_ok = 1, ids_ok = 1, std_ok = 1;
    int64_t checked_uniform = 0;
    for (size_t i = 0; i < n; i++) {
        const db_tname *t = &v[i];
        int64_t N = db_shape_numel(t->ndim, t->shape);
        float *x = malloc((size_t)N * sizeof *x), *y = malloc((size_t)N * sizeof *y);
        if (t->init == DB_INIT_POSITION_IDS) {
            int64_t *ids = malloc((size_t)N * sizeof *ids);
            ids_ok &= !db_init_tensor(t, 1, ids, DB_I64, &err);
            for (int64_t j = 0; j < N; j++)
                ids_ok &= ids[j] == j;
            free(ids);
            free(x);
            free(y);
            continue;
        }
        if (db_init_tensor(t, 42, x, DB_F32, &err)) {
            tap_diag("%s", err.msg);
            det_ok = 0;
        }
        db_init_tensor(t, 42, y, DB_F32, &err);
        det_ok &= !memcmp(x, y, (size_t)N * sizeof *x);
        /* in two pieces split at an odd place: the same values */
        int64_t cut = N / 3 | 1;
        if (cut > N)
            cut = N;
        db_init_tensor_range(t, 42, y, DB_F32, 0, cut, &err);
        db_init_tensor_range(t, 42, y + cut, DB_F32, cut, N - cut, &err);
        split_ok &= !memcmp(x, y, (size_t)N * sizeof *x);
        double s = 0, s2 = 0, mx = 0;
        for (int64_t j = 0; j < N; j++) {
            s += x[j];
            s2 += (double)x[j] * x[j];
            mx = fmax(mx, fabs(x[j]));
        }
        double mean = s / N, sd = sqrt(s2 / N - mean * mean);
        switch (t->init) {
        case DB_INIT_ONE:
        case DB_INIT_ZERO:
            for (int64_t j = 0; j < N; j++)
                const_ok &= x[j] == (t->init == DB_INIT_ONE ? 1.0f : 0.0f);
            break;
        case DB_INIT_LINEAR_W:
        case DB_INIT_LINEAR_B:
        case DB_INIT_CONV_W:
        case DB_INIT_CONV_B: {
            double bound = 1 / sqrt((double)t->fan_in);
            bounds_ok &= mx <= bound * (1 + 1e-6);
            /* U(-b, b): mean 0 +- 5 sigma of the mean, sd b/sqrt(3) */
            if (fabs(mean) > 5 * bound / sqrt(3.0 * N)) {
                stats_ok = 0;
                tap_diag("%s: mean %g", t->compvis, mean);
            }
            if (N >= 4096) {
                checked_uniform++;
                if (fabs(sd / (bound / sqrt(3.0)) - 1) > 0.05) {
                    stats_ok = 0;
                    tap_diag("%s: sd %g, want %g", t->compvis, sd, bound / sqrt(3.0));
                }
            }
            break;
        }
        case DB_INIT_EMBED:
        case DB_INIT_NORMAL:
            if (fabs(mean) > 5 * t->init_std / sqrt((double)N) || (N >= 2048 && fabs(sd / t->init_std - 1) > 0.05)) {
                std_ok = 0;
                tap_diag("%s: mean %g sd %g, want sd %g", t->compvis, mean, sd, t->init_std);
            }
            break;
        }
        free(x);
        free(y);
    }
    tap_ok(det_ok, "same seed, same values");
    tap_ok(split_ok, "values do not depend on how the range is split");
    tap_ok(bounds_ok, "Linear/Conv values within 1/sqrt(fan_in)");
    tap_ok(stats_ok && checked_uniform > 20, "uniform means ~0 and sd ~bound/sqrt(3) (%lld large tensors)",
           (long long)checked_uniform);
    tap_ok(std_ok, "normal inits: mean ~0, sd ~init_std");
    tap_ok(const_ok, "norm weights 1, biases 0");
    tap_ok(ids_ok, "position_ids 0..76 as int64");

    /* the name and the seed select the stream; dtype only rounds */
    const db_tname *q = NULL, *k = NULL;
    for (size_t i = 0; i < n; i++) {
        if (strstr(v[i].compvis, "layers.0.self_attn.q_proj.weight"))
            q = &v[i];
        if (strstr(v[i].compvis, "layers.0.self_attn.k_proj.weight"))
            k = &v[i];
    }
    float x[1024], y[1024];
    uint16_t h[1024];
    db_init_tensor(q, 7, x, DB_F32, &err);
    db_init_tensor(k, 7, y, DB_F32, &err);
    tap_ok(memcmp(x, y, sizeof x), "same shape, different names: different values");
    db_init_tensor(q, 8, y, DB_F32, &err);
    tap_ok(memcmp(x, y, sizeof x), "different seeds: different values");
    db_init_tensor(q, 7, h, DB_BF16, &err);
    int bf_ok = 1;
    for (int j = 0; j < 1024; j++)
        bf_ok &= fabsf(db_bf16_to_f32(h[j]) - x[j]) <= fabsf(x[j]) * 0x1p-8f;
    tap_ok(bf_ok, "bf16 output is the f32 values rounded");
    int64_t big = 0;
    tap_ok(db_init_tensor_range(q, 7, x, DB_F32, 1000, 100, &err) && strstr(err.msg, "range"),
           "out-of-range request refused: %s", err.msg);
    tap_ok(db_init_tensor(q, 7, &big, DB_I64, &err) && strstr(err.msg, "i64"), "integer dtype for weights refused");
    free(v);
}

int main(void)
{
    test_tables();
    test_configs();
    test_detect();
    test_legacy();
    test_init();
    return tap_done();
}
