/* db-ckpt: inspect, convert, verify, diff and initialise checkpoints.
 *
 *   db-ckpt info MODEL|CKPT_DIR|RUN_DIR [--json]
 *   db-ckpt convert MODEL OUT [--to diffusers|safetensors] [--dtype fp32|fp16|bf16]
 *   db-ckpt export CKPT_DIR|RUN_DIR OUT [--to ...] [--dtype ...] [--model BASE] [--force]
 *   db-ckpt diff A B [--tol X]
 *   db-ckpt verify FILE
 *   db-ckpt init --arch sd15|tiny [--config DIR] [--seed N] [--dtype ...] OUT
 *   db-ckpt tokenize MODEL PROMPT...
 *
 * Exit status: 0 success, 1 failure (for diff: the models differ), 2 usage
 * error (for diff: trouble reading them), as cmp(1) does. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "libcommon/core/cli.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/core/log.h"
#include "libcommon/core/progress.h"
#include "libcommon/core/version.h"
#include "libcommon/io/json.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/init.h"
#include "libcommon/sd/tokenizer.h"
#include "libcommon/sd/train_ckpt.h"

typedef struct common_opts {
    int quiet, verbose;
    int64_t threads;
    const char *device;
    const char *config;
} common_opts;

#define COMMON_OPTS(c)                                                                                      \
    {"config", 0, DB_OPT_STR, "DIR", "diffusers-style config folder for a single-file model", &(c).config, \
     NULL, 0},                                                                                              \
        {"threads", 0, DB_OPT_INT, "N", "worker threads (0: all cores)", &(c).threads, "0", 0},             \
        {"device", 0, DB_OPT_STR, "cpu|cuda[:N]", "compute device (cpu-strict: the CPU with a GPU's memory discipline, for tests)", &(c).device, "cpu", 0},                 \
        {"quiet", 'q', DB_OPT_FLAG, NULL, "only errors on stderr", &(c).quiet, NULL, 0},                    \
        {"verbose", 'v', DB_OPT_FLAG, NULL, "more detail on stderr", &(c).verbose, NULL, 0}

static db_log lg = {"db-ckpt", DB_LOG_WARN};

static void setup_log(const common_opts *c)
{
    lg.level = c->quiet ? DB_LOG_QUIET : c->verbose ? DB_LOG_DEBUG : DB_LOG_WARN;
}

static int check_device(const common_opts *c)
{
    if (c->device && strcmp(c->device, "cpu")) {
        db_error(&lg, "--device %s: db-ckpt works on the CPU only", c->device);
        return 2;
    }
    return 0;
}

/* Parse a subcommand's options; returns -1 to continue, or an exit status. */
static int parse(db_cli *cli, int argc, char **argv, char **pos, int *npos, int min_pos, int max_pos)
{
    int rc = db_cli_main(cli, argc, argv, pos, npos, &lg);
    if (rc >= 0)
        return rc;
    if (*npos < min_pos || (max_pos >= 0 && *npos > max_pos)) {
        db_error(&lg, "usage: %s %s", cli->prog, cli->usage);
        return 2;
    }
    return -1;
}

static int open_model(db_model *m, const char *path, const common_opts *c)
{
    db_err e = {0};
    db_model_opts o = {c->config, &lg};
    if (db_model_open(m, path, &o, &e)) {
        db_error(&lg, "%s", e.msg);
        return -1;
    }
    return 0;
}

static const char *levels_str(char *buf, size_t n, int k, const int *v)
{
    size_t o = 0;
    buf[0] = 0;
    for (int i = 0; i < k && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%d", i ? "," : "", v[i]);
    return buf;
}

static void print_stats(const char *label, const db_comp_stats *s)
{
    printf("  %-13s %lld params in %lld tensors (", label, (long long)s->params, (long long)s->tensors);
    int first = 1;
    for (int d = 0; d < DB_NDTYPE; d++)
        if (s->by_dtype[d]) {
            printf("%s%s: %lld", first ? "" : ", ", db_dtype_name((db_dtype)d), (long long)s->by_dtype[d]);
            first = 0;
        }
    printf(")\n");
}

/* ---- training checkpoints ----------------------------------------------------
 * db-train writes RUN_DIR/ckpt-NNNNNN/ (NNNNNN: optimizer steps done):
 * model.safetensors (the trained components, fp32, CompVis names),
 * optimizer.safetensors, state.json and config.json.  See db-ckpt(1), FILES. */

typedef struct train_ckpt {
    char *dir;       /* the ckpt-NNNNNN folder */
    json_t *state;   /* its state.json */
    int64_t step;
    int64_t *steps;  /* for a run folder: every checkpoint's step, ascending */
    size_t nsteps;
} train_ckpt;

static void train_ckpt_free(train_ckpt *ck)
{
    free(ck->dir);
    json_decref(ck->state);
    free(ck->steps);
    memset(ck, 0, sizeof *ck);
}

static int has_file(const char *dir, const char *name)
{
    char p[4200];
    snprintf(p, sizeof p, "%s/%s", dir, name);
    return db_exists(p);
}

/* A folder that means to be a training checkpoint (a missing state.json is
 * then an error, not a reason to read it as a model). */
static int looks_like_train_ckpt(const char *path)
{
    return db_is_dir(path) && !has_file(path, "model_index.json") &&
           (has_file(path, "state.json") || has_file(path, "optimizer.safetensors"));
}

/* PATH is a checkpoint folder, or a run folder whose latest complete
 * checkpoint (the largest step whose state.json reads and that has a
 * model.safetensors) is taken.  Returns 1 when PATH is neither (nothing
 * set), 0 when found, -1 on error. */
static int find_train_ckpt(const char *path, train_ckpt *ck, db_err *e)
{
    memset(ck, 0, sizeof *ck);
    if (looks_like_train_ckpt(path)) {
        if (db_train_ckpt_state(path, &ck->state, &ck->step, e))
            return -1;
        ck->dir = strdup(path);
        return 0;
    }
    if (!db_is_dir(path) || has_file(path, "model_index.json"))
        return 1;
    if (db_train_ckpt_list(path, &ck->steps, &ck->nsteps, e))
        return -1;
    if (!ck->nsteps) {
        free(ck->steps);
        ck->steps = NULL;
        return 1;
    }
    db_err first = {0};
    for (size_t i = ck->nsteps; i-- > 0;) {
        char *dir = db_train_ckpt_path(path, ck->steps[i]);
        db_err why = {0};
        if (!db_train_ckpt_complete(dir, &ck->state, &ck->step, &why)) {
            ck->dir = dir;
            return 0;
        }
        db_warn(&lg, "skipping incomplete checkpoint %s", why.msg);
        if (!first.msg[0])
            first = why;
        free(dir);
    }
    train_ckpt_free(ck);
    db_err_set(e, DB_EFORMAT, "%s: no complete checkpoint (latest: %s)", path, first.msg);
    return -1;
}

/* One value of config.json on a "key = value" line: strings as they are,
 * numbers as printf's %g, everything else as compact JSON. */
static void print_config_value(const json_t *v)
{
    if (json_is_string(v) && !strpbrk(json_string_value(v), "\n\r")) {
        printf("%s\n", json_string_value(v));
        return;
    }
    if (json_is_real(v)) { /* as the lr line prints it: 1e-06 */
        printf("%.9g\n", json_real_value(v));
        return;
    }
    char *s = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT | JSON_REAL_PRECISION(9));
    printf("%s\n", s ? s : "?");
    free(s);
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(const char *const *)a, *(const char *const *)b);
}

/* "0.0123" for a number, "?" otherwise. */
static const char *num_str(char *buf, size_t n, const json_t *v)
{
    if (json_is_number(v))
        snprintf(buf, n, "%.6g", json_number_value(v));
    else
        snprintf(buf, n, "?");
    return buf;
}

static int info_train_ckpt(const char *path, const train_ckpt *ck, int json)
{
    db_err e = {0};
    char p[4200];
    snprintf(p, sizeof p, "%s/model.safetensors", ck->dir);
    db_model w;
    if (db_model_open_raw(&w, p, &e)) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    /* trained tensors per component (unet, vae, text_encoder, other) */
    db_comp_stats st[DB_NCOMP + 1];
    memset(st, 0, sizeof st);
    int64_t params = 0;
    for (size_t i = 0; i < w.raw.n; i++) {
        const db_tentry *t = &w.raw.v[i];
        int c = db_comp_of_compvis(t->name);
        db_comp_stats *s = &st[c < 0 ? DB_NCOMP : c];
        int64_t n = db_shape_numel(t->ndim, t->shape);
        s->tensors++;
        s->params += n;
        s->by_dtype[t->dtype]++;
        params += n;
    }
    size_t ntensors = w.raw.n;
    db_model_close(&w);
    snprintf(p, sizeof p, "%s/config.json", ck->dir);
    json_t *cfg = NULL;
    if (db_exists(p) && !(cfg = db_json_load_object(p, &e))) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    const json_t *s = ck->state;
    if (json) {
        json_t *o = json_object(), *comps = json_object();
        for (int k = 0; k <= DB_NCOMP; k++)
            if (st[k].tensors)
                json_object_set_new(comps, k < DB_NCOMP ? db_comp_name(k) : "other",
                                    json_pack("{s:I, s:I}", "params", (json_int_t)st[k].params, "tensors",
                                              (json_int_t)st[k].tensors));
        json_object_set_new(o, "path", json_string(path));
        json_object_set_new(o, "format", json_string(DB_CKPT_FORMAT));
        json_object_set_new(o, "checkpoint", json_string(ck->dir));
        json_object_set_new(o, "step", json_integer((json_int_t)ck->step));
        if (ck->nsteps) {
            json_t *a = json_array();
            for (size_t i = 0; i < ck->nsteps; i++)
                json_array_append_new(a, json_integer((json_int_t)ck->steps[i]));
            json_object_set_new(o, "checkpoints", a);
        }
        json_object_set_new(o, "trained", json_pack("{s:I, s:I, s:o}", "tensors", (json_int_t)ntensors, "params",
                                                    (json_int_t)params, "components", comps));
        json_object_set_new(o, "state", json_incref((json_t *)s));
        json_object_set_new(o, "config", cfg ? json_incref(cfg) : json_null());
        char *txt = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", txt ? txt : "{}");
        free(txt);
        json_decref(o);
        json_decref(cfg);
        return 0;
    }
    if (ck->nsteps) {
        printf("%s: training run, %zu checkpoint%s (step", path, ck->nsteps, ck->nsteps == 1 ? "" : "s");
        for (size_t i = 0; i < ck->nsteps; i++)
            printf("%s%lld", i ? ", " : (ck->nsteps == 1 ? " " : "s "), (long long)ck->steps[i]);
        printf("); the latest complete one:\n");
    }
    const char *base = json_string_value(json_object_get(s, "base_model"));
    const char *hash = json_string_value(json_object_get(s, "base_model_hash"));
    json_t *te = json_object_get(s, "train_text_encoder"), *loss = json_object_get(s, "loss");
    char b1[64];
    printf("%s: dreambooth-c training checkpoint, step %lld\n", ck->dir, (long long)ck->step);
    printf("  base model    %s (hash %s)\n", base ? base : "?", hash ? hash : "?");
    printf("  text encoder  %s\n", json_is_boolean(te) ? (json_is_true(te) ? "trained" : "not trained") : "?");
    if (json_is_object(loss)) {
        printf("  loss          %s", num_str(b1, sizeof b1, json_object_get(loss, "loss")));
        const char *k;
        json_t *v;
        int first = 1;
        json_object_foreach(loss, k, v) {
            if (!strcmp(k, "loss"))
                continue;
            printf("%s%s %s", first ? " (" : ", ", !strncmp(k, "loss_", 5) ? k + 5 : k, num_str(b1, sizeof b1, v));
            first = 0;
        }
        printf("%s\n", first ? "" : ")");
    } else if (loss) {
        printf("  loss          %s\n", num_str(b1, sizeof b1, loss));
    }
    if (json_object_get(s, "lr"))
        printf("  lr            %s\n", num_str(b1, sizeof b1, json_object_get(s, "lr")));
    printf("  trained       %lld params in %zu tensors\n", (long long)params, ntensors);
    for (int k = 0; k <= DB_NCOMP; k++)
        if (st[k].tensors)
            print_stats(k < DB_NCOMP ? db_comp_name(k) : "other", &st[k]);
    if (!cfg) {
        printf("  config        (no config.json)\n");
        return 0;
    }
    size_t n = json_object_size(cfg), i = 0;
    const char **keys = malloc((n ? n : 1) * sizeof *keys);
    if (!keys) {
        json_decref(cfg);
        db_error(&lg, "out of memory");
        return 1;
    }
    const char *k;
    json_t *v;
    json_object_foreach(cfg, k, v) {
        keys[i++] = k;
    }
    qsort(keys, n, sizeof *keys, cmp_str);
    printf("  config        %zu option%s\n", n, n == 1 ? "" : "s");
    for (i = 0; i < n; i++) {
        printf("    %s = ", keys[i]);
        print_config_value(json_object_get(cfg, keys[i]));
    }
    free(keys);
    json_decref(cfg);
    return 0;
}

static int cmd_info(int argc, char **argv)
{
    common_opts c = {0};
    int json = 0;
    db_opt opts[] = {
        {"json", 0, DB_OPT_FLAG, NULL, "print one JSON object instead of text", &json, NULL, 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt info", "[options] MODEL|CKPT_DIR|RUN_DIR",
                  "Show a checkpoint's format, detected architecture, per-component parameter counts and dtypes, "
                  "and a short content hash (equal for the same weights in any layout). For a db-train checkpoint "
                  "folder (CKPT_DIR, with state.json): its step, base model and hash, whether the text encoder was "
                  "trained, loss and lr, the trained tensors and the training configuration; for a run folder "
                  "(RUN_DIR): its checkpoints' steps, then the latest.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 1, 1);
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)))
        return rc;
    db_err e = {0};
    train_ckpt ck;
    if ((rc = find_train_ckpt(pos[0], &ck, &e)) < 0) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    if (rc == 0) {
        rc = info_train_ckpt(pos[0], &ck, json);
        train_ckpt_free(&ck);
        return rc;
    }
    db_model m;
    if (open_model(&m, pos[0], &c))
        return 1;
    char hash[17];
    if (db_model_hash(&m, hash, &e)) {
        db_error(&lg, "%s: %s", pos[0], e.msg);
        db_model_close(&m);
        return 1;
    }
    db_comp_stats st[DB_NCOMP];
    for (int k = 0; k < DB_NCOMP; k++)
        db_model_stats(&m, k, &st[k]);
    if (json) {
        json_t *o = json_object(), *comps = json_object(), *arch = json_object();
        json_object_set_new(o, "path", json_string(pos[0]));
        json_object_set_new(o, "format", json_string(db_format_name(m.format)));
        json_object_set_new(o, "arch_source", json_string(m.arch_from_config ? "config" : "weights"));
        json_object_set_new(o, "hash", json_string(hash));
        for (int k = 0; k < DB_NCOMP; k++) {
            json_t *d = json_object();
            for (int t = 0; t < DB_NDTYPE; t++)
                if (st[k].by_dtype[t])
                    json_object_set_new(d, db_dtype_name((db_dtype)t), json_integer(st[k].by_dtype[t]));
            json_object_set_new(comps, db_comp_name(k),
                                json_pack("{s:I, s:I, s:o}", "params", (json_int_t)st[k].params, "tensors",
                                          (json_int_t)st[k].tensors, "dtypes", d));
            json_object_set_new(arch, db_comp_name(k), db_arch_to_config(&m.arch, k));
        }
        json_object_set_new(o, "components", comps);
        json_object_set_new(o, "architecture", arch);
        json_object_set_new(o, "scheduler", json_incref(m.scheduler));
        json_object_set_new(o, "ignored_tensors", json_integer((json_int_t)m.n_ignored));
        char *s = json_dumps(o, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
        printf("%s\n", s ? s : "{}");
        free(s);
        json_decref(o);
    } else {
        const db_unet_arch *u = &m.arch.unet;
        const db_vae_arch *v = &m.arch.vae;
        const db_text_arch *t = &m.arch.text;
        char b1[96], b2[96], b3[96];
        printf("%s: %s, SD1.x family (architecture from %s)\n", pos[0], db_format_name(m.format),
               m.arch_from_config ? "config.json" : "tensor shapes");
        printf("  hash          %s\n", hash);
        print_stats("unet", &st[DB_COMP_UNET]);
        printf("                channels %s; layers %d; cross-attention levels %s; heads %s; context %d; depth %d; "
               "%s projection; in %d out %d\n",
               levels_str(b1, sizeof b1, u->nlevels, u->block_out), u->layers_per_block,
               levels_str(b2, sizeof b2, u->nlevels, u->cross_attn), levels_str(b3, sizeof b3, u->nlevels, u->heads),
               u->context_dim, u->transformer_depth, u->use_linear_projection ? "linear" : "conv", u->in_channels,
               u->out_channels);
        print_stats("vae", &st[DB_COMP_VAE]);
        printf("                channels %s; layers %d; latent channels %d; scaling factor %g\n",
               levels_str(b1, sizeof b1, v->nlevels, v->block_out), v->layers_per_block, v->latent_channels,
               v->scaling_factor);
        print_stats("text_encoder", &st[DB_COMP_TEXT]);
        printf("                hidden %d; layers %d; heads %d; mlp %d; vocab %d; positions %d; %s\n", t->hidden,
               t->layers, t->heads, t->intermediate, t->vocab_size, t->max_positions,
               t->quick_gelu ? "quick_gelu" : "gelu");
        const char *sched = json_string_value(json_object_get(m.scheduler, "_class_name"));
        const char *pred = json_string_value(json_object_get(m.scheduler, "prediction_type"));
        printf("  scheduler     %s, %s prediction\n", sched ? sched : "?", pred ? pred : "epsilon");
        if (m.n_ignored)
            printf("  ignored       %zu stored tensors that are not model weights (e.g. %s)\n", m.n_ignored,
                   m.ignored_example);
    }
    db_model_close(&m);
    return 0;
}

static int dtype_opt(const char *s, int *out)
{
    *out = -1;
    if (!s)
        return 0;
    int d = db_dtype_parse(s);
    if (d != DB_F32 && d != DB_F16 && d != DB_BF16) {
        db_error(&lg, "--dtype %s: use fp32, fp16 or bf16", s);
        return 2;
    }
    *out = d;
    return 0;
}

static int to_opt(const char *to, const char *out, int *is_dir)
{
    if (!to) {
        size_t n = strlen(out);
        *is_dir = !(n > 12 && !strcmp(out + n - 12, ".safetensors"));
        return 0;
    }
    if (!strcmp(to, "diffusers"))
        *is_dir = 1;
    else if (!strcmp(to, "safetensors"))
        *is_dir = 0;
    else {
        db_error(&lg, "--to %s: use diffusers or safetensors (writing .ckpt is not supported)", to);
        return 2;
    }
    return 0;
}

static int save(const db_model *m, const char *out, int is_dir, int dtype)
{
    db_err e = {0};
    char dd[4096];
    int rc = is_dir ? db_model_save_diffusers(m, out, dtype, db_data_dir(dd, sizeof dd), &e)
                    : db_model_save_safetensors(m, out, dtype, &e);
    if (rc) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    return 0;
}

static int cmd_convert(int argc, char **argv)
{
    common_opts c = {0};
    const char *to = NULL, *dt = NULL;
    db_opt opts[] = {
        {"to", 0, DB_OPT_STR, "diffusers|safetensors", "output layout (default: from OUT's name)", &to, NULL, 0},
        {"dtype", 0, DB_OPT_STR, "fp32|fp16|bf16", "convert floating-point tensors (default: keep)", &dt, NULL, 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt convert", "[options] MODEL OUT",
                  "Convert between a diffusers folder and a CompVis single .safetensors file (MODEL may also be a "
                  ".ckpt). OUT ending in .safetensors means a single file, anything else a diffusers folder. The "
                  "output appears only when complete.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 2, 2), dtype, is_dir;
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)) || (rc = dtype_opt(dt, &dtype)) || (rc = to_opt(to, pos[1], &is_dir)))
        return rc;
    if (db_exists(pos[1])) {
        db_error(&lg, "%s: already exists (refusing to overwrite)", pos[1]);
        return 1;
    }
    db_model m;
    if (open_model(&m, pos[0], &c))
        return 1;
    rc = save(&m, pos[1], is_dir, dtype);
    db_model_close(&m);
    return rc;
}

typedef struct diffstat {
    double max_abs, num, den;
} diffstat;

static int compare_tensor(const db_model *a, size_t ia, const db_model *b, size_t ib, diffstat *d, db_err *e)
{
    size_t n = (size_t)db_shape_numel(a->t.v[ia].ndim, a->t.v[ia].shape);
    double *x = malloc((n ? n : 1) * sizeof *x), *y = malloc((n ? n : 1) * sizeof *y);
    int rc = -1;
    if (!x || !y) {
        db_err_set(e, DB_ENOMEM, "out of memory");
        goto out;
    }
    if (db_tindex_read(&a->t, ia, x, DB_F64, e) || db_tindex_read(&b->t, ib, y, DB_F64, e))
        goto out;
    db_tindex_release(&a->t, ia);
    db_tindex_release(&b->t, ib);
    memset(d, 0, sizeof *d);
    for (size_t i = 0; i < n; i++) {
        double df = fabs(x[i] - y[i]);
        if (x[i] != y[i] && !(isnan(x[i]) && isnan(y[i]))) {
            if (isnan(df))
                df = INFINITY;
            if (df > d->max_abs)
                d->max_abs = df;
            d->num += df * df;
        }
        d->den += y[i] * y[i];
    }
    rc = 0;
out:
    free(x);
    free(y);
    return rc;
}

static int cmd_export(int argc, char **argv)
{
    common_opts c = {0};
    const char *to = NULL, *dt = "fp16", *base_opt = NULL;
    int force = 0;
    db_opt opts[] = {
        {"to", 0, DB_OPT_STR, "diffusers|safetensors", "output layout (default: from OUT's name)", &to, NULL, 0},
        {"dtype", 0, DB_OPT_STR, "fp32|fp16|bf16", "floating-point dtype of the output", &dt, "fp16", 0},
        {"model", 'm', DB_OPT_STR, "BASE", "base model (default: state.json's base_model)", &base_opt, NULL, 0},
        {"force", 0, DB_OPT_FLAG, NULL, "export even when the base model's hash differs from state.json's", &force,
         NULL, 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt export", "[options] CKPT_DIR|RUN_DIR OUT",
                  "Write a db-train checkpoint as a complete model: the tensors of CKPT_DIR/model.safetensors (the "
                  "fine-tuned UNet, and the text encoder when it was trained) over the base model's (VAE, "
                  "untrained text encoder, configs, scheduler, tokenizer). The base model must have the content "
                  "hash state.json records. OUT ending in .safetensors means a single CompVis-layout file (as "
                  "A1111 and ComfyUI load), anything else a diffusers folder. Given a RUN_DIR, the latest complete "
                  "checkpoint is exported. The output appears only when complete.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 2, 2), dtype, is_dir;
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)) || (rc = dtype_opt(dt, &dtype)) || (rc = to_opt(to, pos[1], &is_dir)))
        return rc;
    /* before hashing gigabytes of base model */
    if (db_exists(pos[1])) {
        db_error(&lg, "%s: already exists (refusing to overwrite)", pos[1]);
        return 1;
    }
    db_err e = {0};
    train_ckpt ck;
    if ((rc = find_train_ckpt(pos[0], &ck, &e)) != 0) {
        if (rc > 0)
            db_error(&lg, "%s: neither a training checkpoint (no state.json) nor a run folder with ckpt-NNNNNN "
                          "checkpoints", pos[0]);
        else
            db_error(&lg, "%s", e.msg);
        return 1;
    }
    if (ck.nsteps && lg.level >= DB_LOG_WARN)
        fprintf(stderr, "%s: exporting %s (step %lld, the latest of %zu checkpoints)\n", lg.prog, ck.dir,
                (long long)ck.step, ck.nsteps);
    char state_path[4200], weights[4200];
    snprintf(state_path, sizeof state_path, "%s/state.json", ck.dir);
    snprintf(weights, sizeof weights, "%s/model.safetensors", ck.dir);
    const char *base = base_opt ? base_opt : json_string_value(json_object_get(ck.state, "base_model"));
    const char *want = json_string_value(json_object_get(ck.state, "base_model_hash"));
    db_model m;
    memset(&m, 0, sizeof m);
    rc = 1;
    if (!base) {
        db_error(&lg, "%s: no \"base_model\"; say which it is with --model BASE", state_path);
        goto out;
    }
    if (!want && !force) {
        db_error(&lg, "%s: no \"base_model_hash\" to check %s against (--force exports anyway)", state_path, base);
        goto out;
    }
    if (open_model(&m, base, &c))
        goto out;
    char hash[17];
    if (db_model_hash(&m, hash, &e)) {
        db_error(&lg, "%s: %s", base, e.msg);
        goto out;
    }
    if (want && strcasecmp(want, hash)) {
        if (!force) {
            db_error(&lg, "%s: base model hash mismatch: the checkpoint was trained from %s, but %s has %s (give "
                          "the right base with --model, or --force)",
                     state_path, want, base, hash);
            goto out;
        }
        db_warn(&lg, "%s: base model hash mismatch (checkpoint %s, %s has %s); exporting anyway (--force)",
                state_path, want, base, hash);
    }
    size_t n = 0;
    if (db_model_overlay(&m, weights, &n, &e)) {
        db_error(&lg, "%s", e.msg);
        goto out;
    }
    db_info(&lg, "%s: %zu of %zu tensors from %s, the rest from %s", pos[1], n, m.t.n, weights, base);
    rc = save(&m, pos[1], is_dir, dtype);
out:
    if (m.path)
        db_model_close(&m);
    train_ckpt_free(&ck);
    return rc;
}

static int cmd_diff(int argc, char **argv)
{
    common_opts c = {0};
    double tol = 0;
    int all = 0;
    db_opt opts[] = {
        {"tol", 0, DB_OPT_FLOAT, "X", "largest relative L2 difference ||a-b||/||b|| allowed per tensor", &tol,
         "0: bit-equal values", 0},
        {"all", 0, DB_OPT_FLAG, NULL, "print every tensor, not only those that differ", &all, NULL, 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt diff", "[options] A B",
                  "Compare two checkpoints tensor by tensor, whatever their layouts (names are mapped): values are "
                  "compared after conversion to float64, so an fp16 and an fp32 file can be compared with --tol. "
                  "Exit status: 0 equal within tolerance, 1 different, 2 trouble.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 2, 2);
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)))
        return rc;
    if (tol < 0) {
        db_error(&lg, "--tol must be >= 0");
        return 2;
    }
    db_model a, b;
    if (open_model(&a, pos[0], &c))
        return 2;
    if (open_model(&b, pos[1], &c)) {
        db_model_close(&a);
        return 2;
    }
    size_t ndiff = 0, nsame = 0;
    double worst = 0;
    const char *worst_name = NULL;
    db_err e = {0};
    rc = 0;
    for (size_t i = 0; i < a.t.n && rc != 2; i++) {
        const db_tentry *ea = &a.t.v[i];
        long j = db_tindex_find(&b.t, ea->name);
        char s1[128], s2[128];
        if (j < 0) {
            printf("only in %s: %s\n", pos[0], ea->name);
            ndiff++;
            continue;
        }
        const db_tentry *eb = &b.t.v[j];
        if (!db_shape_equal(ea->ndim, ea->shape, eb->ndim, eb->shape)) {
            printf("shape differs: %s %s vs %s\n", ea->name, db_shape_str(s1, sizeof s1, ea->ndim, ea->shape),
                   db_shape_str(s2, sizeof s2, eb->ndim, eb->shape));
            ndiff++;
            continue;
        }
        diffstat d;
        if (compare_tensor(&a, i, &b, (size_t)j, &d, &e)) {
            db_error(&lg, "%s", e.msg);
            rc = 2;
            break;
        }
        double rel = d.num == 0 ? 0 : d.den > 0 ? sqrt(d.num / d.den) : INFINITY;
        int differs = tol == 0 ? d.num != 0 : rel > tol;
        if (rel > worst || (!worst_name && d.num)) {
            worst = rel;
            worst_name = ea->name;
        }
        if (differs || all)
            printf("%s %s: max_abs %.6g rel_l2 %.6g (%s vs %s)\n", differs ? "differs" : "ok     ", ea->name,
                   d.max_abs, rel, db_dtype_name(ea->dtype), db_dtype_name(eb->dtype));
        differs ? ndiff++ : nsame++;
    }
    for (size_t j = 0; j < b.t.n && rc != 2; j++)
        if (db_tindex_find(&a.t, b.t.v[j].name) < 0) {
            printf("only in %s: %s\n", pos[1], b.t.v[j].name);
            ndiff++;
        }
    if (rc != 2) {
        printf("%zu tensors equal, %zu differ", nsame, ndiff);
        if (worst_name)
            printf("; largest relative difference %.3g in %s", worst, worst_name);
        printf("\n");
        rc = ndiff ? 1 : 0;
    }
    db_model_close(&a);
    db_model_close(&b);
    return rc;
}

static int cmd_verify(int argc, char **argv)
{
    common_opts c = {0};
    db_opt opts[] = {COMMON_OPTS(c), {0}};
    db_cli cli = {"db-ckpt verify", "[options] FILE",
                  "Read every stored tensor of FILE (.safetensors, .ckpt or a diffusers folder) in full: headers, "
                  "offsets, zip CRCs and sizes are checked and floating-point values must be finite. Then say "
                  "whether it is a complete SD1.x model.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 1, 1);
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)))
        return rc;
    db_model m;
    db_err e = {0};
    if (db_model_open_raw(&m, pos[0], &e)) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    void *buf = NULL;
    size_t cap = 0;
    uint64_t bytes = 0, nonfinite = 0;
    const char *bad_name = NULL;
    db_progress pr;
    db_progress_start(&pr, "verify", (int64_t)m.raw.n, !c.quiet);
    rc = 0;
    for (size_t i = 0; i < m.raw.n; i++) {
        const db_tentry *t = &m.raw.v[i];
        if (t->nbytes > cap) {
            free(buf);
            cap = t->nbytes;
            buf = malloc(cap);
            if (!buf) {
                db_error(&lg, "%s: tensor '%s': out of memory", pos[0], t->name);
                rc = 1;
                break;
            }
        }
        if (db_tindex_read(&m.raw, i, buf, t->dtype, &e)) {
            db_error(&lg, "%s: %s", pos[0], e.msg);
            rc = 1;
            break;
        }
        bytes += t->nbytes;
        db_tindex_release(&m.raw, i);
        if (db_dtype_is_float(t->dtype)) {
            size_t n = (size_t)db_shape_numel(t->ndim, t->shape), es = db_dtype_size(t->dtype);
            uint64_t before = nonfinite;
            double chunk[4096]; /* f64 holds every float dtype exactly */
            for (size_t k = 0; k < n; k += 4096) {
                size_t cnt = n - k < 4096 ? n - k : 4096;
                db_convert(chunk, DB_F64, (char *)buf + k * es, t->dtype, cnt, NULL);
                for (size_t j = 0; j < cnt; j++)
                    nonfinite += !isfinite(chunk[j]);
            }
            if (nonfinite > before && !bad_name)
                bad_name = t->name;
        }
        db_progress_add(&pr, 1);
    }
    free(buf);
    if (!rc) {
        db_progress_end(&pr);
        if (nonfinite) {
            db_error(&lg, "%s: %llu NaN/Inf values (first in tensor '%s')", pos[0], (unsigned long long)nonfinite,
                     bad_name);
            rc = 1;
        } else {
            printf("%s: ok: %zu tensors, %llu bytes read, all values finite\n", pos[0], m.raw.n,
                   (unsigned long long)bytes);
        }
    }
    db_model_close(&m);
    if (!rc) {
        db_model full;
        db_model_opts o = {c.config, NULL};
        if (db_model_open(&full, pos[0], &o, &e))
            printf("%s: not a complete SD1.x model: %s\n", pos[0], e.msg);
        else {
            printf("%s: complete SD1.x model (%s layout)\n", pos[0], db_format_name(full.format));
            db_model_close(&full);
        }
    }
    return rc;
}

static int cmd_init(int argc, char **argv)
{
    common_opts c = {0};
    const char *arch_name = NULL, *to = NULL, *dt = NULL;
    int64_t seed = 0;
    db_opt opts[] = {
        {"arch", 0, DB_OPT_STR, "sd15|tiny", "architecture preset", &arch_name, NULL, 0},
        {"seed", 0, DB_OPT_INT, "N", "random seed (values depend only on seed and tensor name)", &seed, "0", 0},
        {"dtype", 0, DB_OPT_STR, "fp32|fp16|bf16", "weight dtype", &dt, "fp32", 0},
        {"to", 0, DB_OPT_STR, "diffusers|safetensors", "output layout (default: from OUT's name)", &to, NULL, 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt init", "--arch sd15|tiny [options] OUT",
                  "Write a model with random weights of the real SD1.x topology (PyTorch-like default "
                  "initialisation), for tests, benchmarks and the demo. --config DIR takes diffusers-style "
                  "config.json files (DIR/unet/config.json, DIR/vae/config.json, DIR/text_encoder/config.json) to "
                  "make any SD1.x-family size; they override the preset.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 1, 1), dtype, is_dir;
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)) || (rc = dtype_opt(dt, &dtype)) || (rc = to_opt(to, pos[0], &is_dir)))
        return rc;
    if (dtype < 0)
        dtype = DB_F32;
    if (!arch_name && !c.config) {
        db_error(&lg, "init: give --arch sd15|tiny or --config DIR");
        return 2;
    }
    if (db_exists(pos[0])) {
        db_error(&lg, "%s: already exists (refusing to overwrite)", pos[0]);
        return 1;
    }
    db_err e = {0};
    db_arch arch;
    db_model m;
    memset(&m, 0, sizeof m);
    rc = 1;
    if (db_arch_preset(&arch, arch_name ? arch_name : "sd15", &e)) {
        db_error(&lg, "--arch: %s", e.msg);
        return 2;
    }
    if (c.config) {
        json_t *cfg[DB_NCOMP];
        int bad = 0;
        if (db_config_dir_load(c.config, cfg, &e)) {
            db_error(&lg, "%s", e.msg);
            return 1;
        }
        if (!bad && db_arch_from_config(&arch, cfg[0], cfg[1], cfg[2], &e)) {
            db_error(&lg, "%s: %s", c.config, e.msg);
            bad = 1;
        }
        for (int k = 0; k < DB_NCOMP; k++)
            json_decref(cfg[k]);
        if (bad)
            return 1;
    }
    if (db_model_init_random(&m, &arch, (uint64_t)seed, (db_dtype)dtype, &e)) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    rc = save(&m, pos[0], is_dir, -1);
    db_model_close(&m);
    return rc;
}

/* Print one prompt's ids, space separated, on one line. */
static int print_ids(const db_tokenizer *tok, const char *prompt, int len)
{
    int32_t ids[len];
    db_err e = {0};
    if (db_tokenize(tok, prompt, len, ids, NULL, &e)) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    for (int i = 0; i < len; i++)
        printf("%s%d", i ? " " : "", (int)ids[i]);
    putchar('\n');
    return 0;
}

static int cmd_tokenize(int argc, char **argv)
{
    common_opts c = {0};
    int64_t len = DB_CLIP_MAX_LENGTH;
    db_opt opts[] = {
        {"length", 0, DB_OPT_INT, "N", "ids per prompt: BOS, at most N-2 prompt ids, EOS, padding", &len, "77", 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt tokenize", "[options] MODEL PROMPT...",
                  "Print the CLIP token ids of each PROMPT on a line of its own: BOS, the prompt's ids (at most "
                  "75), EOS, padding to 77 -- what diffusers feeds the text encoder. The plain tokenizer: no "
                  "weighting syntax, no chunking. The vocabulary is MODEL's tokenizer/ folder, or the CLIP "
                  "vocabulary shipped with dreambooth-c when MODEL has none (single files); MODEL may also be a "
                  "tokenizer folder itself. A PROMPT of - reads prompts from standard input, one per line.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 2, -1);
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)))
        return rc;
    if (len < 2 || len > 4096) {
        db_error(&lg, "--length %lld: must be in 2..4096", (long long)len);
        return 2;
    }
    db_err e = {0};
    db_tokenizer *tok = NULL;
    char probe[4200], data[4096];
    snprintf(probe, sizeof probe, "%s/vocab.json", pos[0]);
    if (db_is_dir(pos[0]) && db_exists(probe)) {
        rc = db_tokenizer_load(&tok, pos[0], &e);
    } else {
        db_model m;
        if (open_model(&m, pos[0], &c))
            return 1;
        /* a diffusers folder with a tokenizer/ lacking its files is an
         * error, not a reason to fall back to the built-in vocabulary */
        char *tokdir = m.tokenizer_dir ? strdup(m.tokenizer_dir) : NULL;
        if (!tokdir && m.format == DB_FMT_DIFFUSERS) {
            snprintf(probe, sizeof probe, "%s/tokenizer", pos[0]);
            tokdir = db_is_dir(probe) ? strdup(probe) : NULL;
        }
        db_model_close(&m);
        rc = db_tokenizer_load_default(&tok, tokdir, db_data_dir(data, sizeof data), &e);
        free(tokdir);
    }
    if (rc) {
        db_error(&lg, "%s: %s", pos[0], e.msg);
        return 1;
    }
    for (int i = 1; i < npos && !rc; i++) {
        if (strcmp(pos[i], "-")) {
            rc = print_ids(tok, pos[i], (int)len);
            continue;
        }
        char *line = NULL;
        size_t cap = 0;
        ssize_t n;
        while (!rc && (n = getline(&line, &cap, stdin)) >= 0) {
            if (n > 0 && line[n - 1] == '\n')
                line[n - 1] = 0;
            rc = print_ids(tok, line, (int)len);
        }
        free(line);
    }
    db_tokenizer_free(tok);
    if (fflush(stdout) || ferror(stdout)) {
        db_error(&lg, "standard output: write error");
        return 1;
    }
    return rc;
}

/* ---- tokens: rare identifiers ------------------------------------------- */

static int cmp_word(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* data/words/english-3to5.txt: '#' comments, then one word per line.  The
 * lines are pointers into *buf (the caller frees both). */
static int load_words(char **buf, char ***words, size_t *n, db_err *e)
{
    char dir[4096], path[4200];
    size_t len, cap = 0;
    snprintf(path, sizeof path, "%s/words/english-3to5.txt", db_data_dir(dir, sizeof dir));
    *words = NULL;
    *n = 0;
    if (db_read_file(path, 4u << 20, buf, &len, e))
        return -1;
    for (char *p = *buf, *nl; *p; p = nl + 1) {
        nl = strchr(p, '\n');
        if (!nl)
            nl = p + strlen(p) - 1;
        else
            *nl = 0;
        if (*p == '#' || !*p)
            continue;
        if (*n == cap) {
            cap = cap ? 2 * cap : 8192;
            char **nw = realloc(*words, cap * sizeof *nw);
            if (!nw)
                return db_err_set(e, DB_ENOMEM, "out of memory");
            *words = nw;
        }
        (*words)[(*n)++] = p;
    }
    qsort(*words, *n, sizeof **words, cmp_word);
    return 0;
}

static int cmd_tokens(int argc, char **argv)
{
    common_opts c = {0};
    int64_t count = 20;
    int rare = 0;
    const char *model = NULL;
    db_opt opts[] = {
        {"rare", 0, DB_OPT_FLAG, NULL, "list rare single-token words (the only listing so far)", &rare, NULL, 0},
        {"count", 'n', DB_OPT_INT, "N", "how many to list", &count, "20", 0},
        {"model", 'm', DB_OPT_STR, "MODEL", "take the vocabulary from MODEL (default: the shipped CLIP one)", &model,
         NULL, 0},
        COMMON_OPTS(c),
        {0},
    };
    db_cli cli = {"db-ckpt tokens", "--rare [--count N] [--model MODEL]",
                  "List identifiers for DreamBooth's \"a photo of [V] dog\": vocabulary entries that are one whole "
                  "word ('</w>'), 3 to 5 lowercase ASCII letters, tokenize to exactly that one id, and are not "
                  "English words (data/words/english-3to5.txt, from SCOWL), rarest first. CLIP's vocabulary is "
                  "in BPE merge order, so a higher id is a later, rarer merge. One 'TOKEN<TAB>ID' per line.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos, rc = parse(&cli, argc, argv, pos, &npos, 0, 0);
    if (rc >= 0)
        return rc;
    setup_log(&c);
    if ((rc = check_device(&c)))
        return rc;
    if (!rare || count < 1 || count > 100000) {
        db_error(&lg, !rare ? "tokens: say which tokens: --rare" : "--count must be in 1..100000");
        return 2;
    }
    db_err e = {0};
    db_tokenizer *tok = NULL;
    char data[4096], probe[4200];
    if (model) {
        snprintf(probe, sizeof probe, "%s/vocab.json", model);
        if (db_is_dir(model) && db_exists(probe)) {
            rc = db_tokenizer_load(&tok, model, &e);
        } else {
            db_model m;
            if (open_model(&m, model, &c))
                return 1;
            char *tokdir = m.tokenizer_dir ? strdup(m.tokenizer_dir) : NULL;
            db_model_close(&m);
            rc = db_tokenizer_load_default(&tok, tokdir, db_data_dir(data, sizeof data), &e);
            free(tokdir);
        }
    } else {
        rc = db_tokenizer_load_default(&tok, NULL, db_data_dir(data, sizeof data), &e);
    }
    if (rc) {
        db_error(&lg, "%s: %s", model ? model : "built-in vocabulary", e.msg);
        return 1;
    }
    char *wbuf = NULL, **words = NULL;
    size_t nwords = 0;
    if (load_words(&wbuf, &words, &nwords, &e)) {
        db_error(&lg, "%s", e.msg);
        free(wbuf);
        free(words);
        db_tokenizer_free(tok);
        return 1;
    }
    db_tokenizer_info info;
    db_tokenizer_get_info(tok, &info);
    int64_t found = 0;
    for (int32_t id = (int32_t)info.vocab_size - 1; id >= 0 && found < count && !rc; id--) {
        const char *t = db_tokenizer_token(tok, id);
        size_t len = t ? strlen(t) : 0;
        if (id == info.bos || id == info.eos || id == info.pad || id == info.unk || len < 7 || len > 9 ||
            strcmp(t + len - 4, "</w>"))
            continue;
        char w[8];
        int letters = 1;
        for (size_t i = 0; i < len - 4; i++)
            letters &= t[i] >= 'a' && t[i] <= 'z';
        if (!letters)
            continue;
        memcpy(w, t, len - 4);
        w[len - 4] = 0;
        const char *key = w;
        if (bsearch(&key, words, nwords, sizeof *words, cmp_word))
            continue;
        /* In the vocabulary is not enough: BPE must also reach it. */
        int32_t *ids = NULL;
        size_t n = 0;
        if (db_tokenize_words(tok, w, &ids, &n, &e)) {
            db_error(&lg, "%s", e.msg);
            rc = 1;
        } else if (n == 1 && ids[0] == id) {
            printf("%s\t%d\n", w, (int)id);
            found++;
        }
        free(ids);
    }
    free(wbuf);
    free(words);
    db_tokenizer_free(tok);
    if (fflush(stdout) || ferror(stdout)) {
        db_error(&lg, "standard output: write error");
        return 1;
    }
    return rc;
}

static int usage(FILE *f)
{
    fprintf(f, "usage: db-ckpt COMMAND [options] ...\n\n"
               "Inspect, convert, verify, compare and create Stable Diffusion v1.x checkpoints\n"
               "(diffusers folders, CompVis .safetensors and .ckpt files; detected by content).\n\n"
               "commands:\n"
               "  info MODEL|CKPT_DIR [--json]         format, architecture, parameter counts, content hash\n"
               "  convert MODEL OUT [--to L] [--dtype] diffusers folder <-> single .safetensors\n"
               "  export CKPT_DIR OUT [--to L]         db-train checkpoint + base model -> full model\n"
               "  diff A B [--tol X]                   per-tensor differences across layouts (exit 0/1/2)\n"
               "  verify FILE                          full integrity read\n"
               "  init --arch sd15|tiny OUT            random weights of the real SD1.x topology\n"
               "  tokenize MODEL PROMPT...             CLIP token ids of each prompt (77 per line)\n"
               "  tokens --rare [--count N]            rare single-token identifiers for DreamBooth\n\n"
               "'db-ckpt COMMAND --help' describes each command; see also db-ckpt(1).\n");
    return f == stderr ? 2 : 0;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return usage(stderr);
    const char *cmd = argv[1];
    if (!strcmp(cmd, "--help") || !strcmp(cmd, "-h") || !strcmp(cmd, "help"))
        return usage(stdout);
    if (!strcmp(cmd, "--version")) {
        char ver[1024];
        fputs(db_version_text("db-ckpt", ver, sizeof ver), stdout);
        return 0;
    }
    static const struct {
        const char *name;
        int (*fn)(int, char **);
    } cmds[] = {{"info", cmd_info}, {"convert", cmd_convert}, {"export", cmd_export}, {"diff", cmd_diff},
                {"verify", cmd_verify}, {"init", cmd_init}, {"tokenize", cmd_tokenize},
                {"tokens", cmd_tokens}};
    for (size_t i = 0; i < sizeof cmds / sizeof cmds[0]; i++)
        if (!strcmp(cmd, cmds[i].name))
            return cmds[i].fn(argc - 1, argv + 1);
    db_error(&lg, "unknown command '%s'", cmd);
    usage(stderr);
    return 2;
}
