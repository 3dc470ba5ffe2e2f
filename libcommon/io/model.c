#include "model.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "../core/fsutil.h"
#include "../sd/sched.h"
#include "ckpt.h"
#include "json.h"
#include "safetensors.h"

enum { SRC_ST = 1, SRC_CKPT = 2 };

const char *db_format_name(db_format f)
{
    switch (f) {
    case DB_FMT_DIFFUSERS: return "diffusers";
    case DB_FMT_SAFETENSORS: return "safetensors";
    case DB_FMT_CKPT: return "ckpt";
    }
    return "?";
}

json_t *db_default_scheduler_config(void)
{
    return json_pack("{s:s, s:f, s:s, s:f, s:b, s:i, s:s, s:b, s:b, s:i, s:s, s:n}", "_class_name", "PNDMScheduler",
                     "beta_end", 0.012, "beta_schedule", "scaled_linear", "beta_start", 0.00085, "clip_sample", 0,
                     "num_train_timesteps", 1000, "prediction_type", "epsilon", "set_alpha_to_one", 0,
                     "skip_prk_steps", 1, "steps_offset", 1, "timestep_spacing", "leading", "trained_betas");
}

const char *db_data_dir(char *buf, size_t n)
{
    const char *env = getenv("DB_DATA_DIR");
    if (env && *env) {
        snprintf(buf, n, "%s", env);
        return buf;
    }
    char exe[PATH_MAX];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len > 0) {
        exe[len] = 0;
        char *slash = strrchr(exe, '/');
        if (slash) {
            *slash = 0;
            static const char *const rel[] = {"/../../data", "/../share/dreambooth-c", "/../../../data"};
            for (size_t i = 0; i < sizeof rel / sizeof rel[0]; i++) {
                snprintf(buf, n, "%s%s", exe, rel[i]);
                char probe[PATH_MAX + 64];
                snprintf(probe, sizeof probe, "%s/clip/sd-tokenizer/vocab.json", buf);
                if (db_exists(probe))
                    return buf;
            }
        }
    }
    snprintf(buf, n, "/usr/share/dreambooth-c");
    return buf;
}

static int add_src(db_model *m, void *h, int kind, db_err *err)
{
    if (m->nsrc == DB_MODEL_MAXSRC)
        return db_err_set(err, DB_EUNSUPP, "too many weight files");
    m->src[m->nsrc] = h;
    m->src_kind[m->nsrc++] = kind;
    return 0;
}

/* Add the tensors of one weight file to m->raw, names prefixed. */
static int open_weights(db_model *m, const char *path, const char *prefix, int comp, db_err *err)
{
    unsigned char head[16] = {0};
    FILE *f = fopen(path, "rb");
    if (!f)
        return db_err_errno(err, path);
    size_t got = fread(head, 1, sizeof head, f);
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fclose(f);
    if (db_ckpt_probe(head, got)) {
        db_tindex tmp;
        db_tindex_init(&tmp);
        db_ckpt *c;
        if (db_ckpt_open(&c, path, &tmp, err)) {
            db_tindex_free(&tmp);
            return -1;
        }
        if (add_src(m, c, SRC_CKPT, err)) {
            db_ckpt_close(c);
            db_tindex_free(&tmp);
            return -1;
        }
        for (size_t i = 0; i < tmp.n; i++) {
            db_tentry e = tmp.v[i];
            char name[1400];
            snprintf(name, sizeof name, "%s%s", prefix ? prefix : "", tmp.v[i].name);
            e.name = name;
            e.comp = comp;
            if (db_tindex_add(&m->raw, &e, err)) {
                db_tindex_free(&tmp);
                return db_err_prefix(err, "%s", path);
            }
        }
        db_tindex_free(&tmp);
        return 0;
    }
    if (db_safetensors_probe(head, got, size < 0 ? 0 : (uint64_t)size)) {
        db_safetensors *st;
        if (db_safetensors_open(&st, path, prefix, comp, &m->raw, err))
            return -1;
        return add_src(m, st, SRC_ST, err) ? (db_safetensors_close(st), -1) : 0;
    }
    if (got >= 2 && head[0] == 0x80)
        return db_err_set(err, DB_EUNSUPP,
                          "%s: a legacy (pre-zip) torch.save pickle; re-save it with torch >= 1.6 or as safetensors",
                          path);
    return db_err_set(err, DB_EFORMAT, "%s: neither safetensors nor a PyTorch zip checkpoint (%ld bytes)", path, size);
}

static const char *const weight_names[] = {
    "model.safetensors", "diffusion_pytorch_model.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors", "pytorch_model.bin", "diffusion_pytorch_model.bin",
    "pytorch_model.fp16.bin", "diffusion_pytorch_model.fp16.bin",
};

static int open_diffusers(db_model *m, const char *dir, db_err *err)
{
    char path[PATH_MAX];
    snprintf(path, sizeof path, "%s/model_index.json", dir);
    json_t *idx = db_json_load_object(path, err);
    if (!idx)
        return -1;
    json_decref(idx);
    for (int c = 0; c < DB_NCOMP; c++) {
        snprintf(path, sizeof path, "%s/%s/config.json", dir, db_comp_name(c));
        if (!(m->config[c] = db_json_load_object(path, err)))
            return -1;
        const char *found = NULL;
        for (size_t k = 0; k < sizeof weight_names / sizeof weight_names[0] && !found; k++) {
            snprintf(path, sizeof path, "%s/%s/%s", dir, db_comp_name(c), weight_names[k]);
            if (db_exists(path))
                found = weight_names[k];
        }
        if (!found) {
            snprintf(path, sizeof path, "%s/%s/diffusion_pytorch_model.safetensors.index.json", dir,
                     db_comp_name(c));
            if (db_exists(path) || (snprintf(path, sizeof path, "%s/%s/model.safetensors.index.json", dir,
                                             db_comp_name(c)),
                                    db_exists(path)))
                return db_err_set(err, DB_EUNSUPP, "%s: sharded weights are not supported yet", path);
            return db_err_set(err, DB_EIO, "%s/%s: no weights (model.safetensors, diffusion_pytorch_model.safetensors "
                              "or .bin)", dir, db_comp_name(c));
        }
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%s/", db_comp_name(c));
        if (open_weights(m, path, prefix, c, err))
            return -1;
    }
    /* diffusers writes Python's -Infinity into some scheduler configs */
    snprintf(path, sizeof path, "%s/scheduler/scheduler_config.json", dir);
    if (db_exists(path) && db_sched_config_load(path, &m->scheduler, err))
        return -1;
    /* a tokenizer/ folder is the model's own: an incomplete one is an error
     * later, never a silent fall-back to the built-in vocabulary */
    snprintf(path, sizeof path, "%s/tokenizer", dir);
    if (db_is_dir(path))
        m->tokenizer_dir = db_path_join(dir, "tokenizer");
    if (db_arch_from_config(&m->arch, m->config[DB_COMP_UNET], m->config[DB_COMP_VAE], m->config[DB_COMP_TEXT],
                            err))
        return db_err_prefix(err, "%s", dir);
    m->arch_from_config = 1;
    return 0;
}

/* CompVis text-encoder names from older transformers lack "text_model.". */
static const char *normalize_compvis(const char *name, char *buf, size_t n)
{
    static const char pre[] = "cond_stage_model.transformer.";
    size_t lp = sizeof pre - 1;
    if (!strncmp(name, pre, lp) && strncmp(name + lp, "text_model.", 11)) {
        snprintf(buf, n, "%stext_model.%s", pre, name + lp);
        return buf;
    }
    return name;
}

static int is_vae_attn_1x1(const db_tname *r, const db_tentry *e)
{
    /* CompVis VAE mid attention is a 1x1 conv [C,C,1,1]; some files store it linear [C,C] */
    return r->comp == DB_COMP_VAE && r->ndim == 4 && r->shape[2] == 1 && r->shape[3] == 1 && e->ndim == 2 &&
           e->shape[0] == r->shape[0] && e->shape[1] == r->shape[1];
}

static int is_position_ids(const db_tname *r) { return strstr(r->compvis, "position_ids") != NULL; }

static void note_ignored(db_model *m, const char *name)
{
    if (!m->n_ignored++)
        m->ignored_example = strdup(name);
}

/* Match the stored tensors against the architecture's table, filling m->t. */
static int build_index(db_model *m, const db_tindex *cand, int by_diffusers, db_err *err)
{
    db_tname *rows = NULL;
    size_t nrows = 0;
    if (db_arch_names(&m->arch, &rows, &nrows, err))
        return -1;
    /* name -> row lookup through a tindex used as a hash set */
    db_tindex look;
    db_tindex_init(&look);
    int rc = -1;
    for (size_t r = 0; r < nrows; r++) {
        db_tentry e = {0};
        char key[400];
        if (by_diffusers)
            snprintf(key, sizeof key, "%s/%s", db_comp_name(rows[r].comp), rows[r].diffusers);
        else
            snprintf(key, sizeof key, "%s", rows[r].compvis);
        e.name = key;
        e.key = (int64_t)r;
        if (db_tindex_add(&look, &e, err))
            goto out;
    }
    long *at = malloc((nrows ? nrows : 1) * sizeof *at);
    if (!at) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t r = 0; r < nrows; r++)
        at[r] = -1;
    for (size_t i = 0; i < cand->n; i++) {
        const char *name = cand->v[i].name;
        char buf[400];
        long k = db_tindex_find(&look, name);
        if (k < 0 && by_diffusers && !strncmp(name, "vae/", 4)) {
            char lb[400];
            const char *legacy = db_vae_legacy_name(name + 4, lb, sizeof lb);
            if (legacy) {
                snprintf(buf, sizeof buf, "vae/%s", legacy);
                k = db_tindex_find(&look, buf);
            }
        }
        if (k < 0) {
            note_ignored(m, name);
            continue;
        }
        at[look.v[k].key] = (long)i;
    }
    for (size_t r = 0; r < nrows; r++) {
        const db_tname *row = &rows[r];
        if (at[r] < 0) {
            if (is_position_ids(row))
                continue; /* newer transformers no longer store this buffer */
            db_err_set(err, DB_EFORMAT, "missing tensor '%s'", by_diffusers ? row->diffusers : row->compvis);
            if (by_diffusers)
                db_err_prefix(err, "%s", db_comp_name(row->comp));
            free(at);
            goto out;
        }
        const db_tentry *src = &cand->v[at[r]];
        const int64_t *want = by_diffusers ? row->diff_shape : row->shape;
        int wnd = by_diffusers ? row->diff_ndim : row->ndim;
        if (!db_shape_equal(src->ndim, src->shape, wnd, want) && !is_vae_attn_1x1(row, src)) {
            char a[128], b[128];
            db_err_set(err, DB_EFORMAT, "tensor '%s': shape %s but the architecture needs %s", src->name,
                       db_shape_str(a, sizeof a, src->ndim, src->shape), db_shape_str(b, sizeof b, wnd, want));
            free(at);
            goto out;
        }
        db_tentry e = *src;
        e.name = row->compvis;
        e.comp = row->comp;
        e.ndim = row->ndim;
        memcpy(e.shape, row->shape, sizeof e.shape[0] * 4);
        if (!is_position_ids(row) && !db_dtype_is_float(src->dtype)) {
            db_err_set(err, DB_EFORMAT, "tensor '%s': dtype %s is not floating point", src->name,
                       db_dtype_name(src->dtype));
            free(at);
            goto out;
        }
        if (db_tindex_add(&m->t, &e, err)) {
            free(at);
            goto out;
        }
    }
    m->arch.text.has_position_ids = db_tindex_find(&m->t, "cond_stage_model.transformer.text_model.embeddings."
                                                          "position_ids") >= 0;
    free(at);
    rc = 0;
out:
    db_tindex_free(&look);
    free(rows);
    return rc;
}

/* The arch detected from weights must agree with what the configs say. */
static int check_consistency(db_model *m, db_err *err)
{
    db_arch d;
    memset(&d, 0, sizeof d);
    if (db_arch_detect(&d, &m->t, err))
        return db_err_prefix(err, "weights do not match config.json");
    const db_arch *c = &m->arch;
    char what[160] = "";
    /* only the first nlevels entries of the per-level arrays mean anything */
    if (d.unet.nlevels != c->unet.nlevels ||
        memcmp(d.unet.block_out, c->unet.block_out, (size_t)c->unet.nlevels * sizeof d.unet.block_out[0]))
        snprintf(what, sizeof what, "unet block_out_channels");
    else if (d.unet.layers_per_block != c->unet.layers_per_block)
        snprintf(what, sizeof what, "unet layers_per_block");
    else if (d.unet.context_dim != c->unet.context_dim)
        snprintf(what, sizeof what, "unet cross_attention_dim %d vs weights %d", c->unet.context_dim,
                 d.unet.context_dim);
    else if (d.vae.latent_channels != c->vae.latent_channels || d.vae.nlevels != c->vae.nlevels ||
             memcmp(d.vae.block_out, c->vae.block_out, (size_t)c->vae.nlevels * sizeof d.vae.block_out[0]))
        snprintf(what, sizeof what, "vae channels");
    else if (d.text.hidden != c->text.hidden || d.text.layers != c->text.layers ||
             d.text.intermediate != c->text.intermediate || d.text.vocab_size != c->text.vocab_size)
        snprintf(what, sizeof what, "text_encoder sizes");
    if (what[0])
        return db_err_set(err, DB_EFORMAT, "config.json disagrees with the weights: %s", what);
    return 0;
}

static int open_single(db_model *m, const char *path, const db_model_opts *o, db_err *err)
{
    if (open_weights(m, path, NULL, -1, err))
        return -1;
    m->format = m->src_kind[0] == SRC_CKPT ? DB_FMT_CKPT : DB_FMT_SAFETENSORS;
    return 0;
}

static int map_single(db_model *m, const db_model_opts *o, db_err *err)
{
    /* candidates: stored tensors under a known component prefix, normalised */
    db_tindex cand;
    db_tindex_init(&cand);
    int rc = -1;
    for (size_t i = 0; i < m->raw.n; i++) {
        char buf[1400];
        const char *name = normalize_compvis(m->raw.v[i].name, buf, sizeof buf);
        int comp = db_comp_of_compvis(name);
        if (comp < 0) {
            note_ignored(m, m->raw.v[i].name);
            continue;
        }
        db_tentry e = m->raw.v[i];
        e.name = name;
        e.comp = comp;
        if (db_tindex_add(&cand, &e, err))
            goto out;
    }
    if (o && o->config_dir) {
        json_t *cfg[DB_NCOMP] = {0};
        if (db_config_dir_load(o->config_dir, cfg, err))
            goto cfgout;
        if (db_arch_detect(&m->arch, &cand, err))
            goto cfgout;
        if (db_arch_from_config(&m->arch, cfg[0], cfg[1], cfg[2], err)) {
            db_err_prefix(err, "%s", o->config_dir);
            goto cfgout;
        }
        m->arch_from_config = 1;
        for (int c = 0; c < DB_NCOMP; c++)
            m->config[c] = cfg[c], cfg[c] = NULL;
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/scheduler/scheduler_config.json", o->config_dir);
        if (db_exists(p) && db_sched_config_load(p, &m->scheduler, err))
            goto cfgout;
        rc = 0;
    cfgout:
        for (int c = 0; c < DB_NCOMP; c++)
            json_decref(cfg[c]);
        if (rc)
            goto out;
        rc = -1;
    } else if (db_arch_detect(&m->arch, &cand, err)) {
        goto out;
    }
    if (build_index(m, &cand, 0, err))
        goto out;
    if (m->arch_from_config && check_consistency(m, err))
        goto out;
    rc = 0;
out:
    db_tindex_free(&cand);
    return rc;
}

int db_model_open_raw(db_model *m, const char *path, db_err *err)
{
    memset(m, 0, sizeof *m);
    db_tindex_init(&m->t);
    db_tindex_init(&m->raw);
    m->path = strdup(path);
    int rc;
    if (db_is_dir(path)) {
        m->format = DB_FMT_DIFFUSERS;
        rc = open_diffusers(m, path, err);
    } else {
        rc = open_single(m, path, NULL, err);
    }
    if (rc) {
        db_model_close(m);
        return -1;
    }
    return 0;
}

int db_model_open(db_model *m, const char *path, const db_model_opts *o, db_err *err)
{
    if (db_model_open_raw(m, path, err))
        return -1;
    int rc;
    if (m->format == DB_FMT_DIFFUSERS) {
        rc = build_index(m, &m->raw, 1, err);
        if (!rc)
            rc = check_consistency(m, err);
        if (rc && !strstr(err->msg, path))
            db_err_prefix(err, "%s", path);
    } else {
        rc = map_single(m, o, err);
        if (rc)
            db_err_prefix(err, "%s", path);
    }
    if (!rc && !m->scheduler)
        m->scheduler = db_default_scheduler_config();
    if (!rc && m->n_ignored && o && o->log)
        db_info(o->log, "%s: ignoring %zu stored tensor(s) that are not part of the model (e.g. '%s')", path,
                m->n_ignored, m->ignored_example);
    if (rc) {
        db_model_close(m);
        return -1;
    }
    return 0;
}

void db_model_close(db_model *m)
{
    for (int i = 0; i < m->nsrc; i++) {
        if (m->src_kind[i] == SRC_ST)
            db_safetensors_close(m->src[i]);
        else if (m->src_kind[i] == SRC_CKPT)
            db_ckpt_close(m->src[i]);
        else if (m->src_kind[i] == DB_MODEL_SRC_OWNED && ((db_tsrc *)m->src[i])->close)
            ((db_tsrc *)m->src[i])->close(m->src[i]);
    }
    for (int c = 0; c < DB_NCOMP; c++)
        json_decref(m->config[c]);
    json_decref(m->scheduler);
    db_tindex_free(&m->t);
    db_tindex_free(&m->raw);
    free(m->tokenizer_dir);
    free(m->ignored_example);
    free(m->path);
    memset(m, 0, sizeof *m);
}

int db_model_overlay(db_model *m, const char *path, size_t *n_replaced, db_err *err)
{
    if (n_replaced)
        *n_replaced = 0;
    if (m->nsrc == DB_MODEL_MAXSRC)
        return db_err_set(err, DB_EUNSUPP, "%s: too many weight files", path);
    db_tindex ov;
    db_tindex_init(&ov);
    db_safetensors *st = NULL;
    long *at = NULL;
    int rc = -1;
    if (db_safetensors_open(&st, path, NULL, -1, &ov, err))
        goto out;
    at = malloc((ov.n ? ov.n : 1) * sizeof *at);
    if (!at) {
        db_err_set(err, DB_ENOMEM, "%s: out of memory", path);
        goto out;
    }
    /* check everything first, so that a failure leaves m as it was */
    for (size_t i = 0; i < ov.n; i++) {
        const db_tentry *o = &ov.v[i];
        char buf[1400];
        long k = db_tindex_find(&m->t, normalize_compvis(o->name, buf, sizeof buf));
        if (k < 0) {
            db_err_set(err, DB_EFORMAT, "%s: tensor '%s' is not in the model", path, o->name);
            goto out;
        }
        for (size_t j = 0; j < i; j++)
            if (at[j] == k) {
                db_err_set(err, DB_EFORMAT, "%s: tensor '%s' is given twice", path, m->t.v[k].name);
                goto out;
            }
        const db_tentry *b = &m->t.v[k];
        /* the VAE's mid attention may be stored [C,C] for the [C,C,1,1] conv */
        int vae_1x1 = b->comp == DB_COMP_VAE && b->ndim == 4 && b->shape[2] == 1 && b->shape[3] == 1 &&
                      o->ndim == 2 && o->shape[0] == b->shape[0] && o->shape[1] == b->shape[1];
        if (!db_shape_equal(o->ndim, o->shape, b->ndim, b->shape) && !vae_1x1) {
            char sa[128], sb[128];
            db_err_set(err, DB_EFORMAT, "%s: tensor '%s': shape %s but the model has %s", path, o->name,
                       db_shape_str(sa, sizeof sa, o->ndim, o->shape), db_shape_str(sb, sizeof sb, b->ndim, b->shape));
            goto out;
        }
        if (db_dtype_is_float(b->dtype) ? !db_dtype_is_float(o->dtype) : o->dtype != b->dtype) {
            db_err_set(err, DB_EFORMAT, "%s: tensor '%s': dtype %s but the model has %s", path, o->name,
                       db_dtype_name(o->dtype), db_dtype_name(b->dtype));
            goto out;
        }
        at[i] = k;
    }
    for (size_t i = 0; i < ov.n; i++) {
        db_tentry *b = &m->t.v[at[i]];
        const db_tentry *o = &ov.v[i];
        /* keep the model's name (its arena), component and shape; take the rest */
        b->dtype = o->dtype;
        b->nbytes = o->nbytes;
        b->ptr = o->ptr;
        b->src = o->src;
        b->key = o->key;
        b->offset = o->offset;
        memcpy(b->strides, o->strides, sizeof b->strides);
    }
    m->src[m->nsrc] = st;
    m->src_kind[m->nsrc++] = SRC_ST;
    st = NULL;
    if (n_replaced)
        *n_replaced = ov.n;
    rc = 0;
out:
    if (st)
        db_safetensors_close(st);
    free(at);
    db_tindex_free(&ov);
    return rc;
}

void db_model_stats(const db_model *m, int comp, db_comp_stats *s)
{
    memset(s, 0, sizeof *s);
    for (size_t i = 0; i < m->t.n; i++) {
        const db_tentry *e = &m->t.v[i];
        if (e->comp != comp)
            continue;
        s->tensors++;
        s->by_dtype[e->dtype]++;
        /* every stored element, buffers included, as a state dict counts */
        s->params += db_shape_numel(e->ndim, e->shape);
    }
}

int db_model_hash(const db_model *m, char hex[17], db_err *err)
{
    XXH3_state_t *st = XXH3_createState();
    if (!st)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    XXH3_64bits_reset(st);
    void *buf = NULL;
    size_t cap = 0;
    int rc = 0;
    for (size_t i = 0; i < m->t.n && !rc; i++) {
        const db_tentry *e = &m->t.v[i];
        XXH3_64bits_update(st, e->name, strlen(e->name) + 1);
        const char *dn = db_dtype_name(e->dtype);
        XXH3_64bits_update(st, dn, strlen(dn) + 1);
        XXH3_64bits_update(st, &e->ndim, sizeof e->ndim);
        XXH3_64bits_update(st, e->shape, sizeof e->shape[0] * (size_t)e->ndim);
        if (e->ptr) {
            XXH3_64bits_update(st, e->ptr, e->nbytes);
            db_tindex_release(&m->t, i);
            continue;
        }
        if (e->nbytes > cap) {
            free(buf);
            cap = e->nbytes;
            if (!(buf = malloc(cap))) {
                rc = db_err_set(err, DB_ENOMEM, "out of memory");
                break;
            }
        }
        rc = db_tindex_read(&m->t, i, buf, e->dtype, err);
        if (!rc)
            XXH3_64bits_update(st, buf, e->nbytes);
    }
    if (!rc)
        snprintf(hex, 17, "%016llx", (unsigned long long)XXH3_64bits_digest(st));
    free(buf);
    XXH3_freeState(st);
    return rc;
}

/* --- writing ---------------------------------------------------------------- */

typedef struct conv_ctx {
    const db_model *m;
    const long *entry;
    const db_st_item *items;
} conv_ctx;

static int fill_conv(void *vctx, size_t i, void *dst, db_err *err)
{
    conv_ctx *c = vctx;
    int rc = db_tindex_read(&c->m->t, (size_t)c->entry[i], dst, c->items[i].dtype, err);
    db_tindex_release(&c->m->t, (size_t)c->entry[i]);
    return rc;
}

static db_dtype out_dtype(const db_tentry *e, int dtype)
{
    return dtype >= 0 && db_dtype_is_float(e->dtype) ? (db_dtype)dtype : e->dtype;
}

int db_model_save_safetensors(const db_model *m, const char *path, int dtype, db_err *err)
{
    db_st_item *items = calloc(m->t.n ? m->t.n : 1, sizeof *items);
    long *entry = calloc(m->t.n ? m->t.n : 1, sizeof *entry);
    if (!items || !entry) {
        free(items);
        free(entry);
        return db_err_set(err, DB_ENOMEM, "out of memory");
    }
    for (size_t i = 0; i < m->t.n; i++) {
        const db_tentry *e = &m->t.v[i];
        items[i].name = e->name;
        items[i].dtype = out_dtype(e, dtype);
        items[i].ndim = e->ndim;
        memcpy(items[i].shape, e->shape, sizeof e->shape);
        entry[i] = (long)i;
    }
    static const char *const meta[] = {"format", "pt", "written_by", "dreambooth-c " DB_VERSION, NULL};
    conv_ctx c = {m, entry, items};
    int rc = db_safetensors_write(path, items, m->t.n, meta, fill_conv, &c, err);
    free(items);
    free(entry);
    return rc;
}

static int copy_file(const char *from, const char *to, db_err *err)
{
    char *buf;
    size_t n;
    if (db_read_file(from, (size_t)64 << 20, &buf, &n, err))
        return -1;
    FILE *f = fopen(to, "wb");
    int bad = !f || fwrite(buf, 1, n, f) != n;
    if (f && fclose(f))
        bad = 1;
    free(buf);
    return bad ? db_err_errno(err, to) : 0;
}

static int dump_json(json_t *j, const char *path, db_err *err)
{
    if (!j)
        return db_err_set(err, DB_ENOMEM, "%s: could not build JSON", path);
    int rc = json_dump_file(j, path, JSON_INDENT(2) | JSON_SORT_KEYS);
    return rc ? db_err_errno(err, path) : 0;
}

int db_model_save_diffusers(const db_model *m, const char *dir, int dtype, const char *data_dir, db_err *err)
{
    db_outfile od;
    if (db_outdir_open(&od, dir, err))
        return -1;
    db_tname *rows = NULL;
    size_t nrows = 0;
    db_st_item *items = NULL;
    long *entry = NULL;
    int rc = -1;
    char path[PATH_MAX];
    if (db_arch_names(&m->arch, &rows, &nrows, err))
        goto out;
    items = calloc(nrows ? nrows : 1, sizeof *items);
    entry = calloc(nrows ? nrows : 1, sizeof *entry);
    if (!items || !entry) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    for (int c = 0; c < DB_NCOMP; c++) {
        snprintf(path, sizeof path, "%s/%s", od.tmp_path, db_comp_name(c));
        if (mkdir(path, 0755)) {
            db_err_errno(err, path);
            goto out;
        }
        json_t *cfg = db_arch_to_config(&m->arch, c);
        snprintf(path, sizeof path, "%s/%s/config.json", od.tmp_path, db_comp_name(c));
        int bad = dump_json(cfg, path, err);
        json_decref(cfg);
        if (bad)
            goto out;
        size_t n = 0;
        for (size_t r = 0; r < nrows; r++) {
            if (rows[r].comp != c)
                continue;
            long k = db_tindex_find(&m->t, rows[r].compvis);
            if (k < 0)
                continue; /* only position_ids may be absent (checked at open) */
            const db_tentry *e = &m->t.v[k];
            items[n].name = rows[r].diffusers;
            items[n].dtype = out_dtype(e, dtype);
            items[n].ndim = rows[r].diff_ndim;
            memcpy(items[n].shape, rows[r].diff_shape, sizeof rows[r].diff_shape);
            entry[n++] = k;
        }
        snprintf(path, sizeof path, "%s/%s/%s", od.tmp_path, db_comp_name(c),
                 c == DB_COMP_TEXT ? "model.safetensors" : "diffusion_pytorch_model.safetensors");
        conv_ctx cc = {m, entry, items};
        static const char *const meta[] = {"format", "pt", NULL};
        if (db_safetensors_write(path, items, n, meta, fill_conv, &cc, err))
            goto out;
    }
    snprintf(path, sizeof path, "%s/scheduler", od.tmp_path);
    mkdir(path, 0755);
    snprintf(path, sizeof path, "%s/scheduler/scheduler_config.json", od.tmp_path);
    if (dump_json(m->scheduler, path, err))
        goto out;
    /* tokenizer: the source's own, else the CLIP vocabulary we ship */
    char tok[PATH_MAX];
    if (m->tokenizer_dir)
        snprintf(tok, sizeof tok, "%s", m->tokenizer_dir);
    else
        snprintf(tok, sizeof tok, "%s/clip/sd-tokenizer", data_dir ? data_dir : ".");
    snprintf(path, sizeof path, "%s/tokenizer", od.tmp_path);
    mkdir(path, 0755);
    static const char *const tok_files[] = {"vocab.json", "merges.txt", "special_tokens_map.json",
                                            "tokenizer_config.json"};
    for (size_t k = 0; k < 4; k++) {
        char from[PATH_MAX + 64], to[PATH_MAX + 64];
        snprintf(from, sizeof from, "%s/%s", tok, tok_files[k]);
        snprintf(to, sizeof to, "%s/tokenizer/%s", od.tmp_path, tok_files[k]);
        if (!db_exists(from) && k >= 2)
            continue;
        if (copy_file(from, to, err))
            goto out;
    }
    json_t *mi = json_pack("{s:s, s:s, s:[s,s], s:[s,s], s:[s,s], s:[s,s], s:[s,s], s:[n,n], s:[n,n], s:b}",
                           "_class_name", "StableDiffusionPipeline", "_diffusers_version", "0.27.2", "scheduler",
                           "diffusers", json_string_value(json_object_get(m->scheduler, "_class_name"))
                               ? json_string_value(json_object_get(m->scheduler, "_class_name"))
                               : "PNDMScheduler",
                           "text_encoder", "transformers", "CLIPTextModel", "tokenizer", "transformers",
                           "CLIPTokenizer", "unet", "diffusers", "UNet2DConditionModel", "vae", "diffusers",
                           "AutoencoderKL", "safety_checker", "feature_extractor", "requires_safety_checker", 0);
    snprintf(path, sizeof path, "%s/model_index.json", od.tmp_path);
    int bad = dump_json(mi, path, err);
    json_decref(mi);
    if (bad)
        goto out;
    rc = db_outfile_commit(&od, err);
out:
    if (rc)
        db_outfile_abort(&od);
    free(rows);
    free(items);
    free(entry);
    return rc;
}

int db_config_dir_load(const char *dir, json_t *cfg[DB_NCOMP], db_err *err)
{
    for (int c = 0; c < DB_NCOMP; c++)
        cfg[c] = NULL;
    for (int c = 0; c < DB_NCOMP; c++) {
        char p[PATH_MAX];
        snprintf(p, sizeof p, "%s/%s/config.json", dir, db_comp_name(c));
        if (db_exists(p) && !(cfg[c] = db_json_load_object(p, err))) {
            for (int k = 0; k < c; k++) {
                json_decref(cfg[k]);
                cfg[k] = NULL;
            }
            return -1;
        }
    }
    return 0;
}
