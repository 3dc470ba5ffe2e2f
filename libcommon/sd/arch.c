/* Architecture: component names, presets, diffusers config.json in and out,
 * validation.  The tensor table is in names.c, detection in detect.c. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "arch.h"
#include "../io/json.h"

static const char *const comp_names[DB_NCOMP] = {"unet", "vae", "text_encoder"};
static const char *const comp_prefixes[DB_NCOMP] = {"model.diffusion_model.", "first_stage_model.",
                                                    "cond_stage_model.transformer."};

const char *db_comp_name(int comp)
{
    return comp >= 0 && comp < DB_NCOMP ? comp_names[comp] : NULL;
}

const char *db_comp_prefix(int comp)
{
    return comp >= 0 && comp < DB_NCOMP ? comp_prefixes[comp] : NULL;
}

int db_comp_of_compvis(const char *name)
{
    for (int c = 0; c < DB_NCOMP; c++)
        if (!strncmp(name, comp_prefixes[c], strlen(comp_prefixes[c])))
            return c;
    return -1;
}

/* ---- presets ---------------------------------------------------------------- */

/* SD1.x topology: four levels, attention on the first three down levels and
 * the last three up levels, 8 heads, 1x1-conv projections, CLIP ViT-L/14 text
 * layout with quick_gelu.  Sizes are filled by the callers. */
static void sd1_topology(db_arch *a)
{
    memset(a, 0, sizeof *a);
    db_unet_arch *u = &a->unet;
    u->in_channels = u->out_channels = 4;
    u->nlevels = 4;
    for (int i = 0; i < 4; i++) {
        u->cross_attn[i] = i < 3;
        u->up_cross_attn[i] = i > 0;
        u->heads[i] = 8;
    }
    u->layers_per_block = 2;
    u->transformer_depth = 1;
    u->norm_groups = 32;
    u->norm_eps = 1e-5;
    u->flip_sin_to_cos = 1;
    u->freq_shift = 0;

    db_vae_arch *v = &a->vae;
    v->in_channels = v->out_channels = 3;
    v->latent_channels = 4;
    v->nlevels = 4;
    v->layers_per_block = 2;
    v->norm_groups = 32;
    v->scaling_factor = 0.18215;

    db_text_arch *t = &a->text;
    t->vocab_size = 49408;
    t->max_positions = 77;
    t->quick_gelu = 1;
    t->eps = 1e-5;
    t->has_position_ids = 1;
}

static void set_levels(int *dst, int a, int b, int c, int d)
{
    dst[0] = a, dst[1] = b, dst[2] = c, dst[3] = d;
}

int db_arch_preset(db_arch *a, const char *name, db_err *err)
{
    sd1_topology(a);
    db_unet_arch *u = &a->unet;
    db_vae_arch *v = &a->vae;
    db_text_arch *t = &a->text;
    if (!strcmp(name, "sd15")) {
        set_levels(u->block_out, 320, 640, 1280, 1280);
        u->context_dim = 768;
        u->sample_size = 64;
        set_levels(v->block_out, 128, 256, 512, 512);
        v->sample_size = 512;
        t->hidden = 768, t->intermediate = 3072, t->layers = 12, t->heads = 12;
    } else if (!strcmp(name, "tiny")) {
        /* tests/data/tiny: the tiny-dev model of the reference fixtures */
        set_levels(u->block_out, 32, 64, 64, 64);
        u->context_dim = 32;
        u->sample_size = 16;
        set_levels(v->block_out, 32, 32, 64, 64);
        v->sample_size = 128;
        t->hidden = 32, t->intermediate = 64, t->layers = 2, t->heads = 4;
    } else {
        return db_err_set(err, DB_EUSAGE, "unknown architecture preset '%s' (known: sd15, tiny)", name);
    }
    u->time_embed_dim = 4 * u->block_out[0];
    return 0;
}

/* ---- config.json in ------------------------------------------------------------ */

/* Present and not null. */
static const json_t *jget(const json_t *o, const char *key)
{
    const json_t *v = json_object_get(o, key);
    return v && !json_is_null(v) ? v : NULL;
}

/* An integer (or an integral number), > 0 unless allow_zero. */
static int as_int(const json_t *v, const char *key, int allow_zero, int *out, db_err *err)
{
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
        d = json_real_value(v);
    else
        return db_err_set(err, DB_EFORMAT, "'%s' is %s, expected an integer", key, db_json_type_name(v));
    if (d < (allow_zero ? 0 : 1) || d > 1e9)
        return db_err_set(err, DB_EFORMAT, "'%s' = %.0f is out of range", key, d);
    *out = (int)d;
    return 0;
}

static int jint(const json_t *o, const char *key, int allow_zero, int *out, db_err *err)
{
    const json_t *v = jget(o, key);
    return v ? as_int(v, key, allow_zero, out, err) : 0;
}

static int jreal(const json_t *o, const char *key, double *out, db_err *err)
{
    const json_t *v = jget(o, key);
    if (!v)
        return 0;
    if (!json_is_number(v))
        return db_err_set(err, DB_EFORMAT, "'%s' is %s, expected a number", key, db_json_type_name(v));
    *out = json_number_value(v);
    return 0;
}

static int jbool(const json_t *o, const char *key, int *out, db_err *err)
{
    const json_t *v = jget(o, key);
    if (!v)
        return 0;
    if (!json_is_boolean(v))
        return db_err_set(err, DB_EFORMAT, "'%s' is %s, expected true or false", key, db_json_type_name(v));
    *out = json_is_true(v);
    return 0;
}

/* An integer for every level, or a list of n of them. */
static int jint_levels(const json_t *o, const char *key, int n, int *out, db_err *err)
{
    const json_t *v = jget(o, key);
    if (!v)
        return 0;
    if (!json_is_array(v)) {
        int x;
        if (as_int(v, key, 0, &x, err))
            return -1;
        for (int i = 0; i < n; i++)
            out[i] = x;
        return 0;
    }
    if ((int)json_array_size(v) != n)
        return db_err_set(err, DB_EFORMAT, "'%s' has %zu entries for %d levels", key, json_array_size(v), n);
    for (int i = 0; i < n; i++)
        if (as_int(json_array_get(v, (size_t)i), key, 0, &out[i], err))
            return -1;
    return 0;
}

/* An integer, or a list of equal integers (the only form we support). */
static int jint_uniform(const json_t *o, const char *key, int n, int *out, db_err *err)
{
    int v[DB_MAXLEVELS];
    for (int i = 0; i < n; i++)
        v[i] = *out;
    if (jint_levels(o, key, n, v, err))
        return -1;
    for (int i = 1; i < n; i++)
        if (v[i] != v[0])
            return db_err_set(err, DB_EUNSUPP, "'%s' differs between levels (%d vs %d); not supported", key, v[0],
                              v[i]);
    *out = v[0];
    return 0;
}

static int refuse(const json_t *v, const char *key, const char *why, db_err *err)
{
    char *s = json_dumps(v, JSON_COMPACT | JSON_ENCODE_ANY);
    db_err_set(err, DB_EUNSUPP, "%s = %s is not supported (%s)", key, s ? s : "?", why);
    free(s);
    return -1;
}

/* Keys that must be absent/null, or equal a given string, number or false:
 * everything beyond the SD1.x/SD2.x UNet that the forward code implements. */
typedef struct { const char *key, *str; double num; int kind; } must;
enum { MUST_NULL, MUST_STR, MUST_NUM, MUST_FALSE, MUST_TRUE };

static int check_musts(const json_t *o, const must *m, size_t n, db_err *err)
{
    for (size_t i = 0; i < n; i++) {
        const json_t *v = jget(o, m[i].key);
        if (!v)
            continue;
        int ok = 1;
        switch (m[i].kind) {
        case MUST_NULL: ok = 0; break;
        case MUST_STR: ok = json_is_string(v) && !strcmp(json_string_value(v), m[i].str); break;
        case MUST_NUM: ok = json_is_number(v) && json_number_value(v) == m[i].num; break;
        case MUST_TRUE: ok = json_is_true(v); break;
        case MUST_FALSE:
            if (json_is_array(v)) { /* only_cross_attention may be per level */
                size_t k;
                const json_t *x;
                json_array_foreach(v, k, x) ok &= json_is_false(x);
            } else {
                ok = json_is_false(v);
            }
            break;
        }
        if (!ok) {
            char why[96];
            if (m[i].kind == MUST_STR)
                snprintf(why, sizeof why, "only \"%s\"", m[i].str);
            else if (m[i].kind == MUST_NUM)
                snprintf(why, sizeof why, "only %g", m[i].num);
            else
                snprintf(why, sizeof why, "only %s",
                         m[i].kind == MUST_NULL ? "null" : m[i].kind == MUST_TRUE ? "true" : "false");
            return refuse(v, m[i].key, why, err);
        }
    }
    return 0;
}

static const must unet_musts[] = {
    {"class_embed_type", NULL, 0, MUST_NULL},
    {"addition_embed_type", NULL, 0, MUST_NULL}, /* SDXL */
    {"time_cond_proj_dim", NULL, 0, MUST_NULL},  /* LCM */
    {"encoder_hid_dim", NULL, 0, MUST_NULL},
    {"encoder_hid_dim_type", NULL, 0, MUST_NULL},
    {"num_class_embeds", NULL, 0, MUST_NULL},
    {"time_embedding_act_fn", NULL, 0, MUST_NULL},
    {"timestep_post_act", NULL, 0, MUST_NULL},
    {"cross_attention_norm", NULL, 0, MUST_NULL},
    {"reverse_transformer_layers_per_block", NULL, 0, MUST_NULL},
    {"resnet_time_scale_shift", "default", 0, MUST_STR},
    {"attention_type", "default", 0, MUST_STR},
    {"act_fn", "silu", 0, MUST_STR},
    {"time_embedding_type", "positional", 0, MUST_STR},
    {"conv_in_kernel", NULL, 3, MUST_NUM},
    {"conv_out_kernel", NULL, 3, MUST_NUM},
    {"downsample_padding", NULL, 1, MUST_NUM},
    {"mid_block_scale_factor", NULL, 1, MUST_NUM},
    {"resnet_out_scale_factor", NULL, 1, MUST_NUM},
    {"dropout", NULL, 0, MUST_NUM},
    {"dual_cross_attention", NULL, 0, MUST_FALSE},
    {"only_cross_attention", NULL, 0, MUST_FALSE},
    {"mid_block_only_cross_attention", NULL, 0, MUST_FALSE},
    {"center_input_sample", NULL, 0, MUST_FALSE},
    {"resnet_skip_time_act", NULL, 0, MUST_FALSE},
    {"class_embeddings_concat", NULL, 0, MUST_FALSE},
};

static const must vae_musts[] = {
    {"act_fn", "silu", 0, MUST_STR},
    {"shift_factor", NULL, 0, MUST_NULL}, /* SD3/Flux VAEs */
    {"use_quant_conv", NULL, 0, MUST_TRUE},
    {"use_post_quant_conv", NULL, 0, MUST_TRUE},
    {"mid_block_add_attention", NULL, 0, MUST_TRUE},
};

/* A list of n block type names, each one of two accepted; flags[i] = 1 for
 * the `yes` type. */
static int block_types(const json_t *o, const char *key, int n, const char *yes, const char *no, int *flags,
                       db_err *err)
{
    const json_t *v = jget(o, key);
    if (!v)
        return 0;
    if (!json_is_array(v) || (int)json_array_size(v) != n)
        return db_err_set(err, DB_EFORMAT, "'%s' must be a list of %d block types (one per block_out_channels entry)",
                          key, n);
    for (int i = 0; i < n; i++) {
        const json_t *s = json_array_get(v, (size_t)i);
        if (json_is_string(s) && !strcmp(json_string_value(s), yes))
            flags[i] = 1;
        else if (no && json_is_string(s) && !strcmp(json_string_value(s), no))
            flags[i] = 0;
        else
            return refuse(s, key, no ? "only the SD1.x block types" : "only the SD1.x VAE blocks", err);
    }
    return 0;
}

static int class_is(const json_t *o, const char *want, db_err *err)
{
    const json_t *v = jget(o, "_class_name");
    if (v && (!json_is_string(v) || strcmp(json_string_value(v), want))) {
        char why[64];
        snprintf(why, sizeof why, "expected \"%s\"", want);
        return refuse(v, "_class_name", why, err);
    }
    return 0;
}

/* The list of channels per level. */
static int block_out(const json_t *o, int *n, int *out, db_err *err)
{
    const json_t *v = jget(o, "block_out_channels");
    if (!v)
        return 0;
    if (!json_is_array(v) || json_array_size(v) < 1 || json_array_size(v) > DB_MAXLEVELS)
        return db_err_set(err, DB_EFORMAT, "'block_out_channels' must be a list of 1 to %d integers", DB_MAXLEVELS);
    *n = (int)json_array_size(v);
    for (int i = 0; i < *n; i++)
        if (as_int(json_array_get(v, (size_t)i), "block_out_channels", 0, &out[i], err))
            return -1;
    return 0;
}

static int unet_from_config(db_unet_arch *u, const json_t *o, db_err *err)
{
    if (!json_is_object(o))
        return db_err_set(err, DB_EFORMAT, "config is not a JSON object");
    if (class_is(o, "UNet2DConditionModel", err) || check_musts(o, unet_musts, sizeof unet_musts / sizeof *unet_musts, err))
        return -1;
    const json_t *mid = json_object_get(o, "mid_block_type");
    if (mid && (!json_is_string(mid) || strcmp(json_string_value(mid), "UNetMidBlock2DCrossAttn")))
        return refuse(mid, "mid_block_type", "only \"UNetMidBlock2DCrossAttn\"", err);

    /* UNet2DConditionModel's defaults (diffusers 0.27) */
    memset(u, 0, sizeof *u);
    u->in_channels = u->out_channels = 4;
    u->nlevels = 4;
    const int def_out[4] = {320, 640, 1280, 1280};
    for (int i = 0; i < 4; i++) {
        u->block_out[i] = def_out[i];
        u->cross_attn[i] = i < 3;
        u->up_cross_attn[i] = i > 0;
    }
    u->layers_per_block = 2;
    u->transformer_depth = 1;
    u->context_dim = 1280;
    u->norm_groups = 32;
    u->norm_eps = 1e-5;
    u->sample_size = 64; /* diffusers: None; the SD1.x value */
    u->flip_sin_to_cos = 1;

    if (block_out(o, &u->nlevels, u->block_out, err))
        return -1;
    const int L = u->nlevels;
    if (block_types(o, "down_block_types", L, "CrossAttnDownBlock2D", "DownBlock2D", u->cross_attn, err) ||
        block_types(o, "up_block_types", L, "CrossAttnUpBlock2D", "UpBlock2D", u->up_cross_attn, err))
        return -1;
    /* SD1.x names the number of heads attention_head_dim (diffusers' historic
     * naming); num_attention_heads, when given, wins. */
    for (int i = 0; i < L; i++)
        u->heads[i] = 8;
    if (jint_levels(o, "attention_head_dim", L, u->heads, err) ||
        jint_levels(o, "num_attention_heads", L, u->heads, err))
        return -1;
    if (jint_uniform(o, "layers_per_block", L, &u->layers_per_block, err) ||
        jint_uniform(o, "transformer_layers_per_block", L, &u->transformer_depth, err) ||
        jint_uniform(o, "cross_attention_dim", L, &u->context_dim, err) ||
        jint(o, "in_channels", 0, &u->in_channels, err) || jint(o, "out_channels", 0, &u->out_channels, err) ||
        jint(o, "norm_num_groups", 0, &u->norm_groups, err) || jreal(o, "norm_eps", &u->norm_eps, err) ||
        jint(o, "sample_size", 0, &u->sample_size, err) || jbool(o, "flip_sin_to_cos", &u->flip_sin_to_cos, err) ||
        jbool(o, "use_linear_projection", &u->use_linear_projection, err) ||
        jint(o, "freq_shift", 1, &u->freq_shift, err))
        return -1;
    u->time_embed_dim = 4 * u->block_out[0];
    if (jint(o, "time_embedding_dim", 0, &u->time_embed_dim, err))
        return -1;
    return 0;
}

static int vae_from_config(db_vae_arch *v, const json_t *o, db_err *err)
{
    if (!json_is_object(o))
        return db_err_set(err, DB_EFORMAT, "config is not a JSON object");
    if (class_is(o, "AutoencoderKL", err) || check_musts(o, vae_musts, sizeof vae_musts / sizeof *vae_musts, err))
        return -1;
    /* AutoencoderKL's defaults */
    memset(v, 0, sizeof *v);
    v->in_channels = v->out_channels = 3;
    v->latent_channels = 4;
    v->nlevels = 1;
    v->block_out[0] = 64;
    v->layers_per_block = 1;
    v->norm_groups = 32;
    v->sample_size = 32;
    v->scaling_factor = 0.18215;
    if (block_out(o, &v->nlevels, v->block_out, err))
        return -1;
    int flags[DB_MAXLEVELS];
    if (block_types(o, "down_block_types", v->nlevels, "DownEncoderBlock2D", NULL, flags, err) ||
        block_types(o, "up_block_types", v->nlevels, "UpDecoderBlock2D", NULL, flags, err))
        return -1;
    if (jint(o, "in_channels", 0, &v->in_channels, err) || jint(o, "out_channels", 0, &v->out_channels, err) ||
        jint(o, "latent_channels", 0, &v->latent_channels, err) ||
        jint(o, "layers_per_block", 0, &v->layers_per_block, err) ||
        jint(o, "norm_num_groups", 0, &v->norm_groups, err) || jint(o, "sample_size", 0, &v->sample_size, err) ||
        jreal(o, "scaling_factor", &v->scaling_factor, err))
        return -1;
    return 0;
}

static int text_from_config(db_text_arch *t, const json_t *o, db_err *err)
{
    if (!json_is_object(o))
        return db_err_set(err, DB_EFORMAT, "config is not a JSON object");
    const json_t *mt = jget(o, "model_type");
    if (mt && (!json_is_string(mt) || strcmp(json_string_value(mt), "clip_text_model")))
        return refuse(mt, "model_type", "only \"clip_text_model\"", err);
    const json_t *ar = jget(o, "architectures");
    if (ar) {
        const json_t *a0 = json_array_get(ar, 0);
        if (!json_is_array(ar) || json_array_size(ar) != 1 || !json_is_string(a0) ||
            strcmp(json_string_value(a0), "CLIPTextModel"))
            return refuse(ar, "architectures", "only [\"CLIPTextModel\"]", err);
    }
    /* CLIPTextConfig's defaults */
    memset(t, 0, sizeof *t);
    t->vocab_size = 49408;
    t->max_positions = 77;
    t->hidden = 512;
    t->intermediate = 2048;
    t->layers = 12;
    t->heads = 8;
    t->quick_gelu = 1;
    t->eps = 1e-5;
    t->has_position_ids = 1;
    if (jint(o, "vocab_size", 0, &t->vocab_size, err) ||
        jint(o, "max_position_embeddings", 0, &t->max_positions, err) ||
        jint(o, "hidden_size", 0, &t->hidden, err) || jint(o, "intermediate_size", 0, &t->intermediate, err) ||
        jint(o, "num_hidden_layers", 0, &t->layers, err) || jint(o, "num_attention_heads", 0, &t->heads, err) ||
        jreal(o, "layer_norm_eps", &t->eps, err))
        return -1;
    const json_t *act = jget(o, "hidden_act");
    if (act) {
        const char *s = json_is_string(act) ? json_string_value(act) : "";
        if (!strcmp(s, "quick_gelu"))
            t->quick_gelu = 1;
        else if (!strcmp(s, "gelu"))
            t->quick_gelu = 0;
        else
            return refuse(act, "hidden_act", "only \"quick_gelu\" or \"gelu\"", err);
    }
    return 0;
}

int db_arch_from_config(db_arch *a, const json_t *unet, const json_t *vae, const json_t *text, db_err *err)
{
    db_arch n = *a;
    if (unet && unet_from_config(&n.unet, unet, err))
        return db_err_prefix(err, "unet config");
    if (vae && vae_from_config(&n.vae, vae, err))
        return db_err_prefix(err, "vae config");
    if (text && text_from_config(&n.text, text, err))
        return db_err_prefix(err, "text_encoder config");
    /* only what was read: the caller may fill the other components later */
    unsigned comps = (unet ? DB_COMP_BIT(DB_COMP_UNET) : 0) | (vae ? DB_COMP_BIT(DB_COMP_VAE) : 0) |
                     (text ? DB_COMP_BIT(DB_COMP_TEXT) : 0);
    if (db_arch_validate_comps(&n, comps, err))
        return -1;
    *a = n;
    return 0;
}

/* ---- config.json out ------------------------------------------------------------ */

static json_t *int_list(const int *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_integer(v[i]));
    return a;
}

static json_t *str_list(int n, const int *flags, const char *yes, const char *no)
{
    json_t *a = json_array();
    for (int i = 0; i < n; i++)
        json_array_append_new(a, json_string(!flags || flags[i] ? yes : no));
    return a;
}

/* Keys in diffusers' order (alphabetical), so files diff well. */
static json_t *unet_config(const db_unet_arch *u)
{
    const int L = u->nlevels;
    int same_heads = 1;
    for (int i = 1; i < L; i++)
        same_heads &= u->heads[i] == u->heads[0];
    json_t *o = json_object();
    json_object_set_new(o, "_class_name", json_string("UNet2DConditionModel"));
    json_object_set_new(o, "_diffusers_version", json_string("0.27.2"));
    json_object_set_new(o, "act_fn", json_string("silu"));
    json_object_set_new(o, "attention_head_dim", same_heads ? json_integer(u->heads[0]) : int_list(u->heads, L));
    json_object_set_new(o, "block_out_channels", int_list(u->block_out, L));
    json_object_set_new(o, "center_input_sample", json_false());
    json_object_set_new(o, "cross_attention_dim", json_integer(u->context_dim));
    json_object_set_new(o, "down_block_types", str_list(L, u->cross_attn, "CrossAttnDownBlock2D", "DownBlock2D"));
    json_object_set_new(o, "downsample_padding", json_integer(1));
    json_object_set_new(o, "flip_sin_to_cos", json_boolean(u->flip_sin_to_cos));
    json_object_set_new(o, "freq_shift", json_integer(u->freq_shift));
    json_object_set_new(o, "in_channels", json_integer(u->in_channels));
    json_object_set_new(o, "layers_per_block", json_integer(u->layers_per_block));
    json_object_set_new(o, "mid_block_scale_factor", json_integer(1));
    json_object_set_new(o, "mid_block_type", json_string("UNetMidBlock2DCrossAttn"));
    json_object_set_new(o, "norm_eps", json_real(u->norm_eps));
    json_object_set_new(o, "norm_num_groups", json_integer(u->norm_groups));
    json_object_set_new(o, "out_channels", json_integer(u->out_channels));
    json_object_set_new(o, "sample_size", json_integer(u->sample_size));
    json_object_set_new(o, "time_embedding_dim",
                        u->time_embed_dim == 4 * u->block_out[0] ? json_null() : json_integer(u->time_embed_dim));
    json_object_set_new(o, "transformer_layers_per_block", json_integer(u->transformer_depth));
    json_object_set_new(o, "up_block_types", str_list(L, u->up_cross_attn, "CrossAttnUpBlock2D", "UpBlock2D"));
    json_object_set_new(o, "use_linear_projection", json_boolean(u->use_linear_projection));
    return o;
}

static json_t *vae_config(const db_vae_arch *v)
{
    json_t *o = json_object();
    json_object_set_new(o, "_class_name", json_string("AutoencoderKL"));
    json_object_set_new(o, "_diffusers_version", json_string("0.27.2"));
    json_object_set_new(o, "act_fn", json_string("silu"));
    json_object_set_new(o, "block_out_channels", int_list(v->block_out, v->nlevels));
    json_object_set_new(o, "down_block_types", str_list(v->nlevels, NULL, "DownEncoderBlock2D", NULL));
    json_object_set_new(o, "force_upcast", json_true());
    json_object_set_new(o, "in_channels", json_integer(v->in_channels));
    json_object_set_new(o, "latent_channels", json_integer(v->latent_channels));
    json_object_set_new(o, "layers_per_block", json_integer(v->layers_per_block));
    json_object_set_new(o, "norm_num_groups", json_integer(v->norm_groups));
    json_object_set_new(o, "out_channels", json_integer(v->out_channels));
    json_object_set_new(o, "sample_size", json_integer(v->sample_size));
    json_object_set_new(o, "scaling_factor", json_real(v->scaling_factor));
    json_object_set_new(o, "up_block_types", str_list(v->nlevels, NULL, "UpDecoderBlock2D", NULL));
    return o;
}

static json_t *text_config(const db_text_arch *t)
{
    json_t *o = json_object();
    json_t *arch = json_array();
    json_array_append_new(arch, json_string("CLIPTextModel"));
    json_object_set_new(o, "architectures", arch);
    json_object_set_new(o, "attention_dropout", json_real(0.0));
    json_object_set_new(o, "bos_token_id", json_integer(0));
    json_object_set_new(o, "dropout", json_real(0.0));
    json_object_set_new(o, "eos_token_id", json_integer(2));
    json_object_set_new(o, "hidden_act", json_string(t->quick_gelu ? "quick_gelu" : "gelu"));
    json_object_set_new(o, "hidden_size", json_integer(t->hidden));
    json_object_set_new(o, "initializer_factor", json_real(1.0));
    json_object_set_new(o, "initializer_range", json_real(0.02));
    json_object_set_new(o, "intermediate_size", json_integer(t->intermediate));
    json_object_set_new(o, "layer_norm_eps", json_real(t->eps));
    json_object_set_new(o, "max_position_embeddings", json_integer(t->max_positions));
    json_object_set_new(o, "model_type", json_string("clip_text_model"));
    json_object_set_new(o, "num_attention_heads", json_integer(t->heads));
    json_object_set_new(o, "num_hidden_layers", json_integer(t->layers));
    json_object_set_new(o, "pad_token_id", json_integer(1));
    json_object_set_new(o, "projection_dim", json_integer(t->hidden));
    json_object_set_new(o, "torch_dtype", json_string("float32"));
    json_object_set_new(o, "transformers_version", json_string("4.26.1"));
    json_object_set_new(o, "vocab_size", json_integer(t->vocab_size));
    return o;
}

json_t *db_arch_to_config(const db_arch *a, int comp)
{
    switch (comp) {
    case DB_COMP_UNET: return unet_config(&a->unet);
    case DB_COMP_VAE: return vae_config(&a->vae);
    case DB_COMP_TEXT: return text_config(&a->text);
    default: return NULL;
    }
}

/* ---- validation and comparison ------------------------------------------------------ */

static int positive(const char *what, int v, int max, db_err *err)
{
    if (v < 1 || v > max)
        return db_err_set(err, DB_EUNSUPP, "%s = %d is out of range (1..%d)", what, v, max);
    return 0;
}

static int groups_divide(const char *comp, int groups, int c, db_err *err)
{
    if (c % groups)
        return db_err_set(err, DB_EUNSUPP, "%s: norm_num_groups = %d does not divide %d channels", comp, groups, c);
    return 0;
}

static int validate_unet(const db_unet_arch *u, db_err *err)
{
    const int big = 1 << 20;
    if (positive("unet levels", u->nlevels, DB_MAXLEVELS, err) ||
        positive("unet layers_per_block", u->layers_per_block, 32, err) ||
        positive("unet transformer depth", u->transformer_depth, 64, err) ||
        positive("unet in_channels", u->in_channels, big, err) ||
        positive("unet out_channels", u->out_channels, big, err) ||
        positive("unet context_dim", u->context_dim, big, err) ||
        positive("unet norm groups", u->norm_groups, big, err) ||
        positive("unet time_embed_dim", u->time_embed_dim, big, err))
        return -1;
    for (int i = 0; i < u->nlevels; i++) {
        int c = u->block_out[i];
        if (positive("unet block_out_channels", c, big, err) || groups_divide("unet", u->norm_groups, c, err))
            return -1;
        /* levels with transformers (down i, up nlevels-1-i, the mid block at
         * the last level) split C into heads */
        int attn = u->cross_attn[i] || u->up_cross_attn[u->nlevels - 1 - i] || i == u->nlevels - 1;
        if (attn && (u->heads[i] < 1 || c % u->heads[i]))
            return db_err_set(err, DB_EUNSUPP, "unet level %d: %d heads (attention_head_dim) do not divide %d channels",
                              i, u->heads[i], c);
    }
    return 0;
}

static int validate_vae(const db_vae_arch *v, db_err *err)
{
    const int big = 1 << 20;
    if (positive("vae levels", v->nlevels, DB_MAXLEVELS, err) ||
        positive("vae layers_per_block", v->layers_per_block, 32, err) ||
        positive("vae in_channels", v->in_channels, big, err) ||
        positive("vae out_channels", v->out_channels, big, err) ||
        positive("vae latent_channels", v->latent_channels, big, err) ||
        positive("vae norm groups", v->norm_groups, big, err))
        return -1;
    for (int i = 0; i < v->nlevels; i++)
        if (positive("vae block_out_channels", v->block_out[i], big, err) ||
            groups_divide("vae", v->norm_groups, v->block_out[i], err))
            return -1;
    return 0;
}

static int validate_text(const db_text_arch *t, db_err *err)
{
    const int big = 1 << 20;
    if (positive("text vocab_size", t->vocab_size, 1 << 24, err) ||
        positive("text max_positions", t->max_positions, big, err) ||
        positive("text hidden", t->hidden, big, err) || positive("text intermediate", t->intermediate, big, err) ||
        positive("text layers", t->layers, 256, err) || positive("text heads", t->heads, big, err))
        return -1;
    if (t->hidden % t->heads)
        return db_err_set(err, DB_EUNSUPP, "text encoder: num_attention_heads = %d does not divide hidden_size %d",
                          t->heads, t->hidden);
    return 0;
}

int db_arch_validate_comps(const db_arch *a, unsigned comps, db_err *err)
{
    if ((comps & DB_COMP_BIT(DB_COMP_UNET)) && validate_unet(&a->unet, err))
        return -1;
    if ((comps & DB_COMP_BIT(DB_COMP_VAE)) && validate_vae(&a->vae, err))
        return -1;
    if ((comps & DB_COMP_BIT(DB_COMP_TEXT)) && validate_text(&a->text, err))
        return -1;
    return 0;
}

int db_arch_validate(const db_arch *a, db_err *err)
{
    return db_arch_validate_comps(a, DB_COMP_ALL, err);
}

int db_arch_equal(const db_arch *a, const db_arch *b, unsigned comps, char *why, size_t n)
{
#define SAME(field, fmt)                                                                       \
    do {                                                                                       \
        if (a->field != b->field) {                                                            \
            snprintf(why, n, "%s: " fmt " vs " fmt, #field, a->field, b->field);               \
            return 0;                                                                          \
        }                                                                                      \
    } while (0)
#define SAME_LEVELS(field, L)                                                                  \
    do {                                                                                       \
        for (int i_ = 0; i_ < (L); i_++)                                                       \
            if (a->field[i_] != b->field[i_]) {                                                \
                snprintf(why, n, "%s[%d]: %d vs %d", #field, i_, a->field[i_], b->field[i_]);  \
                return 0;                                                                      \
            }                                                                                  \
    } while (0)
    if (n)
        why[0] = 0;
    if (comps & DB_COMP_BIT(DB_COMP_UNET)) {
        SAME(unet.nlevels, "%d");
        SAME(unet.in_channels, "%d");
        SAME(unet.out_channels, "%d");
        SAME_LEVELS(unet.block_out, a->unet.nlevels);
        SAME_LEVELS(unet.cross_attn, a->unet.nlevels);
        SAME_LEVELS(unet.up_cross_attn, a->unet.nlevels);
        SAME_LEVELS(unet.heads, a->unet.nlevels);
        SAME(unet.layers_per_block, "%d");
        SAME(unet.transformer_depth, "%d");
        SAME(unet.context_dim, "%d");
        SAME(unet.use_linear_projection, "%d");
        SAME(unet.norm_groups, "%d");
        SAME(unet.norm_eps, "%g");
        SAME(unet.sample_size, "%d");
        SAME(unet.flip_sin_to_cos, "%d");
        SAME(unet.freq_shift, "%d");
        SAME(unet.time_embed_dim, "%d");
    }
    if (comps & DB_COMP_BIT(DB_COMP_VAE)) {
        SAME(vae.nlevels, "%d");
        SAME(vae.in_channels, "%d");
        SAME(vae.out_channels, "%d");
        SAME(vae.latent_channels, "%d");
        SAME_LEVELS(vae.block_out, a->vae.nlevels);
        SAME(vae.layers_per_block, "%d");
        SAME(vae.norm_groups, "%d");
        SAME(vae.sample_size, "%d");
        SAME(vae.scaling_factor, "%g");
    }
    if (comps & DB_COMP_BIT(DB_COMP_TEXT)) {
        SAME(text.vocab_size, "%d");
        SAME(text.max_positions, "%d");
        SAME(text.hidden, "%d");
        SAME(text.intermediate, "%d");
        SAME(text.layers, "%d");
        SAME(text.heads, "%d");
        SAME(text.quick_gelu, "%d");
        SAME(text.eps, "%g");
        SAME(text.has_position_ids, "%d");
    }
    return 1;
#undef SAME
#undef SAME_LEVELS
}

/* ---- legacy diffusers VAE names ----------------------------------------------------- */

const char *db_vae_legacy_name(const char *name, char *buf, size_t n)
{
    /* diffusers < 0.14 stored the VAE mid-block attention as
     * ...attentions.0.{query,key,value,proj_attn}.{weight,bias} */
    static const char *const old[4] = {"query", "key", "value", "proj_attn"};
    static const char *const cur[4] = {"to_q", "to_k", "to_v", "to_out.0"};
    const char *at = strstr(name, ".attentions.");
    if (!at)
        return NULL;
    const char *leaf = strchr(at + strlen(".attentions."), '.'); /* after the index */
    if (!leaf)
        return NULL;
    leaf++;
    for (int i = 0; i < 4; i++) {
        size_t k = strlen(old[i]);
        const char *rest = leaf + k;
        if (strncmp(leaf, old[i], k) || (strcmp(rest, ".weight") && strcmp(rest, ".bias")))
            continue;
        int len = snprintf(buf, n, "%.*s%s%s", (int)(leaf - name), name, cur[i], rest);
        return len >= 0 && (size_t)len < n ? buf : NULL;
    }
    return NULL;
}
