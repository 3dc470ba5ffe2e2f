/* db-prior: class-prior samples for DreamBooth's prior-preservation loss.
 *
 *   db-prior --model M --prompt "a photo of a dog" -n 200 [--shard I/N] -o class.dbt
 *   db-prior collect --from ENDPOINT -n 200 -o class.dbt [--timeout S] [--shards N]
 *
 * Sample i uses noise stream i of --seed only, so a shard is exactly the
 * records I, I+N, ... of the unsharded run.  Each sample travels as its own
 * one-record stream (header, record, trailer): a killed run leaves complete
 * samples and at most one torn tail, which a rerun cuts away before it appends
 * the missing indices, and a collector can keep every sample whose trailer
 * arrived from a producer that died later. */
#include <errno.h>
#include <fcntl.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "libcommon/core/cli.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/core/log.h"
#include "libcommon/core/version.h"
#include "libcommon/io/dbt.h"
#include "libcommon/io/png.h"
#include "libcommon/sd/txt2img.h"

#define MAX_N 1000000

/* What one run generates; the fields that decide a sample's bytes. */
typedef struct prior_run {
    const char *prompt, *negative, *sched;
    int64_t n, steps, width, height, seed;
    double guidance, scaling;
    char hash[17];
    db_precision precision;
} prior_run;

/* Pack the header meta of every sample stream. */
static int header_meta(db_meta *m, const prior_run *p, db_err *err)
{
    db_meta_init(m);
    db_meta_put_str(m, "model_hash", p->hash);
    db_meta_put_float(m, "scaling_factor", p->scaling);
    db_meta_put_str(m, "latents", "x0, already multiplied by scaling_factor (the space training uses)");
    db_meta_put_int(m, "width", p->width);
    db_meta_put_int(m, "height", p->height);
    db_meta_put_str(m, "tool", "db-prior " DB_VERSION);
    return db_meta_finish(m, err);
}

static int record_meta(db_meta *m, const prior_run *p, int64_t index, db_err *err)
{
    db_meta_init(m);
    db_meta_put_str(m, "prompt", p->prompt);
    db_meta_put_str(m, "negative_prompt", p->negative);
    db_meta_put_int(m, "seed", p->seed);
    db_meta_put_int(m, "index", index);
    db_meta_put_str(m, "scheduler", p->sched);
    db_meta_put_int(m, "steps", p->steps);
    db_meta_put_float(m, "guidance", p->guidance);
    /* only when not fp32: files made before --precision existed hold fp32
     * samples without the key, and must still resume as the same settings */
    if (p->precision != DB_PREC_F32)
        db_meta_put_str(m, "precision", db_precision_name(p->precision));
    return db_meta_finish(m, err);
}

/* ---- settings: samples of one file must come from one set of settings ---- */

static void key_add(char *buf, size_t cap, const msgpack_object *map, const char *k)
{
    size_t len = strlen(buf);
    const msgpack_object *v = db_meta_get(map, k);
    if (len + 1 >= cap)
        return;
    if (!v)
        snprintf(buf + len, cap - len, "%s: none; ", k);
    else if (v->type == MSGPACK_OBJECT_STR)
        snprintf(buf + len, cap - len, "%s: '%.*s'; ", k, (int)v->via.str.size, v->via.str.ptr);
    else if (v->type == MSGPACK_OBJECT_POSITIVE_INTEGER)
        snprintf(buf + len, cap - len, "%s: %llu; ", k, (unsigned long long)v->via.u64);
    else if (v->type == MSGPACK_OBJECT_NEGATIVE_INTEGER)
        snprintf(buf + len, cap - len, "%s: %lld; ", k, (long long)v->via.i64);
    else if (v->type == MSGPACK_OBJECT_FLOAT64 || v->type == MSGPACK_OBJECT_FLOAT32)
        snprintf(buf + len, cap - len, "%s: %.17g; ", k, v->via.f64);
    else
        snprintf(buf + len, cap - len, "%s: ?; ", k);
}

/* The settings a sample was made with, as one comparable string. */
static void settings_key(char *buf, size_t cap, const msgpack_object *hdr, const msgpack_object *rec)
{
    static const char *const hkeys[] = {"model_hash", "width", "height"};
    static const char *const rkeys[] = {"prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance",
                                        "precision"};
    buf[0] = 0;
    for (size_t i = 0; i < sizeof hkeys / sizeof *hkeys; i++)
        key_add(buf, cap, hdr, hkeys[i]);
    for (size_t i = 0; i < sizeof rkeys / sizeof *rkeys; i++)
        key_add(buf, cap, rec, rkeys[i]);
}

#define KEY_CAP 16384

/* Our own settings key, computed from the metadata we write, so the
 * comparison can never drift from the format. */
static int own_key(char *buf, const prior_run *p, db_err *err)
{
    db_meta h, r;
    int rc = -1;
    if (!header_meta(&h, p, err) && !record_meta(&r, p, 0, err)) {
        msgpack_unpacked uh, ur;
        msgpack_unpacked_init(&uh);
        msgpack_unpacked_init(&ur);
        if (msgpack_unpack_next(&uh, h.buf, h.len, NULL) == MSGPACK_UNPACK_SUCCESS &&
            msgpack_unpack_next(&ur, r.buf, r.len, NULL) == MSGPACK_UNPACK_SUCCESS) {
            settings_key(buf, KEY_CAP, &uh.data, &ur.data);
            rc = 0;
        } else {
            db_err_set(err, DB_EFORMAT, "internal: cannot read back our own metadata");
        }
        msgpack_unpacked_destroy(&uh);
        msgpack_unpacked_destroy(&ur);
        db_meta_free(&r);
    }
    db_meta_free(&h);
    return rc;
}

/* ---- reading samples back: resume and collect ---- */

/* What we know of the samples already kept. */
typedef struct sample_set {
    int64_t n;
    uint8_t *have; /* [n] */
    int64_t count; /* indices of [0, n) present */
    char *key;     /* settings of the kept samples; "" until the first one */
} sample_set;

/* Is the msgpack object p[0..n) a stream trailer (a map with key "end")?
 * Trailers are small; anything big is a record and needs no unpacking. */
static int is_trailer(const uint8_t *p, size_t n)
{
    if (n > 4096 || !n || !((p[0] & 0xf0) == 0x80 || p[0] == 0xde || p[0] == 0xdf))
        return 0;
    msgpack_unpacked u;
    msgpack_unpacked_init(&u);
    int yes = msgpack_unpack_next(&u, (const char *)p, n, NULL) == MSGPACK_UNPACK_SUCCESS &&
              db_meta_get(&u.data, "end") != NULL;
    msgpack_unpacked_destroy(&u);
    return yes;
}

/* Check the whole streams in buf[0..len) and note their samples in s.
 * A stream must hold prior records whose index and settings agree with s;
 * with dups non-NULL a record already in s sets *dups instead of failing
 * (the caller then drops the stream).  label names the input in errors.
 * Nothing in s changes unless everything checks out. */
static int take_streams(sample_set *s, const uint8_t *buf, size_t len, const char *label, int *dups, db_err *err)
{
    db_dbt_reader *r;
    db_dbt_record rec;
    int rc;
    char *key = malloc(KEY_CAP), *first = calloc(1, KEY_CAP);
    int64_t *idx = NULL, nidx = 0, cap = 0;
    if (dups)
        *dups = 0;
    if (!key || !first) {
        free(key);
        free(first);
        return db_err_set(err, DB_ENOMEM, "out of memory");
    }
    if (db_dbt_open_mem(&r, buf, len, label, NULL, err)) {
        free(key);
        free(first);
        return -1;
    }
    while ((rc = db_dbt_next(r, &rec, err)) == 1) {
        int64_t i;
        if (strcmp(rec.stream->kind, "prior") || strncmp(rec.name, "prior/", 6) ||
            !db_meta_int(&rec.meta, "index", &i) || i < 0 || rec.dtype != DB_F32 || rec.ndim != 3) {
            rc = db_err_set(err, DB_EFORMAT, "%s: record '%s' at offset %llu is not a db-prior sample", label,
                            rec.name, (unsigned long long)rec.offset);
            break;
        }
        settings_key(key, KEY_CAP, &rec.stream->meta, &rec.meta);
        const char *want = s->key[0] ? s->key : first[0] ? first : NULL;
        if (want && strcmp(key, want)) {
            rc = db_err_set(err, DB_EFORMAT, "%s: sample %lld was made with other settings (%s) than %s (%s)", label,
                            (long long)i, key, s->key[0] ? "this run" : "the first sample", want);
            break;
        }
        if (!first[0])
            snprintf(first, KEY_CAP, "%s", key);
        if (i < s->n && s->have[i] && dups) {
            *dups = 1;
            continue;
        }
        if (nidx == cap) {
            int64_t *grown = realloc(idx, (size_t)(cap = cap ? 2 * cap : 64) * sizeof *idx);
            if (!grown) {
                rc = db_err_set(err, DB_ENOMEM, "out of memory");
                break;
            }
            idx = grown;
        }
        idx[nidx++] = i;
    }
    db_dbt_reader_close(r);
    /* only now, with every trailer checked, do the samples count */
    if (rc == 0 && !(dups && *dups)) {
        for (int64_t k = 0; k < nidx; k++)
            if (idx[k] < s->n && !s->have[idx[k]]) {
                s->have[idx[k]] = 1;
                s->count++;
            }
        if (!s->key[0])
            snprintf(s->key, KEY_CAP, "%s", first);
    }
    free(idx);
    free(key);
    free(first);
    return rc < 0 ? -1 : 0;
}

/* Read an existing output file: note its samples in s and set *keep to the
 * length of its prefix of whole streams (what a killed run left intact). */
static int scan_existing(sample_set *s, const char *path, uint64_t *keep, uint64_t *size, db_err *err)
{
    char *buf;
    size_t len;
    *keep = *size = 0;
    if (!db_exists(path))
        return 0;
    if (db_read_file(path, (size_t)1 << 40, &buf, &len, err))
        return -1;
    *size = len;
    /* walk object boundaries; a torn last object stops the walk */
    uint64_t off = 0;
    while (off < len) {
        db_mpwalk w;
        db_mpwalk_init(&w, DB_DBT_MAX_OBJECT);
        int st = db_mpwalk_run(&w, (const uint8_t *)buf + off, len - off);
        if (st == DB_MPW_MORE)
            break; /* torn: the tail of an interrupted write */
        if (st == DB_MPW_BAD) {
            /* not what a kill leaves: refuse rather than cut away samples */
            db_err_set(err, DB_EFORMAT, "%s: corrupt at offset %llu (%s); not resuming into it", path,
                       (unsigned long long)off, w.why);
            free(buf);
            return -1;
        }
        if (is_trailer((const uint8_t *)buf + off, w.off))
            *keep = off + w.off;
        off += w.off;
    }
    /* a bad stream before the torn tail is not ours to cut away */
    int rc = take_streams(s, (const uint8_t *)buf, *keep, path, NULL, err);
    free(buf);
    return rc;
}

/* Open the output for appending, cutting a torn tail away first. */
static int open_append(const char *path, uint64_t keep, int *fd, db_err *err)
{
    *fd = open(path, O_WRONLY | O_CREAT | O_CLOEXEC, 0666);
    if (*fd < 0)
        return db_err_errno(err, path);
    if (ftruncate(*fd, (off_t)keep) || lseek(*fd, 0, SEEK_END) < 0 || fsync(*fd)) {
        db_err_errno(err, path);
        close(*fd);
        return -1;
    }
    /* the file's name must survive a crash too */
    char *dir = strdup(path), *slash = dir ? strrchr(dir, '/') : NULL;
    if (slash)
        slash[slash == dir] = 0;
    int rc = dir ? db_fsync_path(slash ? dir : ".", 1, err) : db_err_set(err, DB_ENOMEM, "out of memory");
    free(dir);
    if (rc)
        close(*fd);
    return rc;
}

/* One whole stream appended and on disk before the next sample starts. */
static int append_stream(int fd, const char *path, const void *p, size_t n, db_err *err)
{
    if (db_write_all(fd, p, n, err))
        return -1;
    /* EINVAL: a pipe (collect -o -), where there is nothing to sync */
    if (fsync(fd) && errno != EINVAL)
        return db_err_errno(err, path);
    return 0;
}

/* ---- generate ---- */

/* One sample as a one-record stream on w. */
/* header_sent: the stream's header went out before the sample was made
 * (see generate_main), so only the record and the trailer are left. */
static int write_sample(db_dbt_writer *w, const prior_run *p, const db_meta *hm, int64_t index, int C,
                        const float *lat, int header_sent, db_err *err)
{
    db_meta rm;
    char name[32];
    int64_t shape[3] = {C, p->height / 8, p->width / 8};
    snprintf(name, sizeof name, "prior/%lld", (long long)index);
    int rc = record_meta(&rm, p, index, err) ||
             (!header_sent && db_dbt_write_header(w, "prior", hm->buf, hm->len, err)) ||
             db_dbt_write_record(w, name, DB_F32, 3, shape, lat, rm.buf, rm.len, err) || db_dbt_end_stream(w, err);
    db_meta_free(&rm);
    return rc ? -1 : 0;
}

/* A file output gets each sample through the writer into `part` (so the
 * format code stays in one place), then appended and fsynced. */
static int file_sample(int fd, const char *out, const char *part, const prior_run *p, const db_meta *hm,
                       int64_t index, int C, const float *lat, db_err *err)
{
    db_dbt_writer *w;
    if (db_dbt_open_write(&w, part, NULL, err))
        return -1;
    if (write_sample(w, p, hm, index, C, lat, 0, err)) {
        db_dbt_abort(w, err->msg);
        return -1;
    }
    if (db_dbt_close(w, err))
        return -1;
    char *buf;
    size_t len;
    int rc = db_read_file(part, (size_t)1 << 40, &buf, &len, err);
    if (!rc) {
        rc = append_stream(fd, out, buf, len, err);
        free(buf);
    }
    unlink(part);
    return rc;
}

static int write_png(const char *dir, const prior_run *p, int64_t index, const float *img, const char *model,
                     db_err *err)
{
    size_t hw = (size_t)p->width * (size_t)p->height;
    uint8_t *rgb = malloc(hw * 3);
    if (!rgb)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    char path[4096], params[8192];
    snprintf(path, sizeof path, "%s/prior-%06lld.png", dir, (long long)index);
    snprintf(params, sizeof params,
             "%s\n%s%s%sSteps: %lld, Sampler: %s, CFG scale: %g, Seed: %lld, Size: %lldx%lld, Model hash: %.10s, "
             "Model: %s, Noise: philox stream %lld, Version: dreambooth-c %s",
             p->prompt, p->negative[0] ? "Negative prompt: " : "", p->negative, p->negative[0] ? "\n" : "",
             (long long)p->steps, p->sched, p->guidance, (long long)p->seed, (long long)p->width,
             (long long)p->height, p->hash, model, (long long)index, DB_VERSION);
    const char *text[] = {"parameters", params, "Software", "dreambooth-c " DB_VERSION, NULL};
    db_image_to_rgb8(rgb, img, (int)p->height, (int)p->width);
    int rc = db_png_write(path, rgb, (int)p->width, (int)p->height, text, err);
    free(rgb);
    return rc;
}

/* Test hook: DB_PRIOR_TEST_HANG_AFTER=K makes a run stop after K samples
 * are out and wait to be killed, so tests can kill a producer at a known
 * point instead of racing it. */
static void test_hang(const db_log *lg, int64_t done)
{
    const char *v = getenv("DB_PRIOR_TEST_HANG_AFTER");
    /* called before each sample (after its header, over ZeroMQ) and after
     * the last, so a hang over ZeroMQ leaves a stream open */
    if (!v || !done || atoll(v) != done)
        return;
    /* even with -q: the test waits for this line */
    fprintf(stderr, "%s: test hook: hanging after %lld samples\n", lg->prog, (long long)done);
    for (;;)
        sleep(60);
}

static int parse_shard(const char *s, int64_t *i, int64_t *n)
{
    char *end;
    errno = 0;
    long long a = strtoll(s, &end, 10);
    if (end == s || *end != '/')
        return -1;
    const char *t = end + 1;
    long long b = strtoll(t, &end, 10);
    if (errno || end == t || *end || b < 1 || b > MAX_N || a < 0 || a >= b)
        return -1;
    *i = a;
    *n = b;
    return 0;
}

static int generate_main(int argc, char **argv)
{
    db_log lg = {"db-prior", DB_LOG_WARN};
    const char *model = NULL, *prompt = NULL, *negative = "", *sched = "ddim", *outp = NULL, *png_dir = NULL;
    const char *device = "cpu", *config = NULL, *shard = "0/1", *precision = "fp32";
    int64_t n = 0, batch = 1, steps = 50, width = 512, height = 512, seed = 0, threads = 0;
    double guidance = 7.5;
    int quiet = 0, verbose = 0, no_graph = 0;
    db_opt opts[] = {
        {"model", 'm', DB_OPT_STR, "MODEL", "checkpoint: diffusers folder, .safetensors or .ckpt", &model, NULL, 0},
        {"prompt", 'p', DB_OPT_STR, "TEXT", "the class prompt, e.g. \"a photo of a dog\"", &prompt, NULL, 0},
        {"negative-prompt", 0, DB_OPT_STR, "TEXT", "what to steer away from", &negative, "\"\"", 0},
        {"n", 'n', DB_OPT_INT, "N", "samples in the whole (unsharded) set", &n, NULL, 0},
        {"shard", 0, DB_OPT_STR, "I/N", "make only indices I, I+N, I+2N, ...", &shard, "0/1", 0},
        {"batch", 0, DB_OPT_INT, "B", "images per UNet call (consecutive indices only; see the man page)", &batch,
         "1", 0},
        {"steps", 0, DB_OPT_INT, "N", "sampler steps", &steps, "50", 0},
        {"guidance", 'g', DB_OPT_FLOAT, "X", "classifier-free guidance scale (<= 1: none)", &guidance, "7.5", 0},
        {"scheduler", 0, DB_OPT_STR, "NAME", "ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or ddpm", &sched,
         "ddim", 0},
        {"width", 'W', DB_OPT_INT, "PX", "image width, a multiple of 8", &width, "512", 0},
        {"height", 'H', DB_OPT_INT, "PX", "image height, a multiple of 8", &height, "512", 0},
        {"seed", 's', DB_OPT_INT, "S", "noise seed; sample i uses noise stream i", &seed, "0", 0},
        {"output", 'o', DB_OPT_STR, "STREAM", "file (resumable), - or ZeroMQ endpoint", &outp, NULL, 0},
        {"png-dir", 0, DB_OPT_STR, "DIR", "also decode previews to DIR/prior-NNNNNN.png", &png_dir, NULL, 0},
        {"config", 0, DB_OPT_STR, "DIR", "diffusers-style config folder for a single-file model", &config, NULL, 0},
        {"threads", 0, DB_OPT_INT, "N", "worker threads (0: all cores)", &threads, "0", 0},
        {"device", 0, DB_OPT_STR, "cpu|cuda[:N]", "compute device (cpu-strict: the CPU with a GPU's memory discipline, for tests)", &device, "cpu", 0},
        {"precision", 0, DB_OPT_STR, "fp32|bf16|fp16", "compute type of the matmuls, convolutions and attention "
         "(autocast; weights stay fp32; on the CPU an emulation, slower); part of a sample's settings",
         &precision, "fp32", 0},
        {"no-graph", 0, DB_OPT_FLAG, NULL, "on a GPU, launch each denoising step's kernels one by one instead of "
         "replaying the step as a CUDA graph from the second step on (same results; for debugging)", &no_graph, NULL, 0},
        {"quiet", 'q', DB_OPT_FLAG, NULL, "only errors on stderr", &quiet, NULL, 0},
        {"verbose", 'v', DB_OPT_FLAG, NULL, "more detail on stderr", &verbose, NULL, 0},
        {0},
    };
    db_cli cli = {"db-prior", "--model MODEL --prompt TEXT -n N -o STREAM [options]\n"
                  "       db-prior collect --from ENDPOINT -n N -o FILE [options]",
                  "Generate class-prior samples: clean latents x0 (scaled, as training uses them), one record "
                  "'prior/INDEX' each. Sample i uses noise stream i of --seed only, so shards made with --shard I/N "
                  "hold exactly the unsharded run's records and merge with cat. Rerunning with the same output file "
                  "keeps the samples it holds and adds the missing ones.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos;
    db_err e = {0};
    int rc = db_cli_main(&cli, argc, argv, pos, &npos, &lg);
    if (rc >= 0)
        return rc;
    lg.level = quiet ? DB_LOG_QUIET : verbose ? DB_LOG_DEBUG : DB_LOG_WARN;
    if (npos) {
        db_error(&lg, "unexpected argument '%s' (see --help)", pos[0]);
        return 2;
    }
    if (!model || !prompt || !outp || !db_cli_given(&cli, "n")) {
        db_error(&lg, "--model, --prompt, -n and -o are required (see --help)");
        return 2;
    }
    int64_t si, sn;
    if (parse_shard(shard, &si, &sn)) {
        db_error(&lg, "--shard %s: want I/N with 0 <= I < N", shard);
        return 2;
    }
    if (db_device_check(device, &e)) {
        db_error(&lg, "%s", e.msg);
        return 2;
    }
    const int prec = db_precision_parse(precision);
    if (prec < 0) {
        db_error(&lg, "--precision %s: unknown precision (fp32, bf16 or fp16)", precision);
        return 2;
    }
    if (n < 1 || n > MAX_N || batch < 1 || batch > 1024 || steps < 1 || steps > 10000 || width < 8 || height < 8 ||
        width > 8192 || height > 8192 || threads < 0) {
        db_error(&lg, "out-of-range value among -n, --batch, --steps, --width, --height, --threads");
        return 2;
    }
    if (width % 8 || height % 8) {
        db_error(&lg, "--width %lld --height %lld: both must be multiples of 8", (long long)width, (long long)height);
        return 2;
    }
    db_dbt_target tgt;
    if (db_dbt_parse_target(&tgt, outp, &e)) {
        db_error(&lg, "%s", e.msg);
        return 2;
    }
    if (png_dir && mkdir(png_dir, 0777) && errno != EEXIST) {
        db_error(&lg, "%s: %s", png_dir, strerror(errno));
        return 1;
    }

    db_sd sd;
    db_model_opts mo = {config, &lg};
    if (db_sd_open_device(&sd, model, &mo, device, (int)threads, &e)) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    db_ctx_set_precision(sd.ctx, (db_precision)prec);
    sd.keep_models = 1; /* one db_txt2img call per sample: load the networks once */
    prior_run p = {prompt, negative, sched, n, steps, width, height, seed, guidance,
                   sd.model.arch.vae.scaling_factor, {0}, (db_precision)prec};
    int C = sd.model.arch.unet.in_channels;
    size_t per = (size_t)C * (size_t)(height / 8) * (size_t)(width / 8), hw = (size_t)width * (size_t)height;
    sample_set s = {n, calloc((size_t)n, 1), 0, malloc(KEY_CAP)};
    db_meta hm = {0};
    db_dbt_writer *w = NULL;
    char *part = NULL;
    int fd = -1;
    int64_t made = 0;
    rc = 1;
    if (!s.have || !s.key) {
        db_err_set(&e, DB_ENOMEM, "out of memory");
        goto out;
    }
    if (db_model_hash(&sd.model, p.hash, &e) || header_meta(&hm, &p, &e) || own_key(s.key, &p, &e))
        goto out;
    if (tgt.kind == DB_DBT_FILE) {
        uint64_t keep, size;
        if (scan_existing(&s, outp, &keep, &size, &e))
            goto out;
        if (keep < size)
            db_warn(&lg, "%s: cutting %llu bytes of an unfinished sample at offset %llu", outp,
                    (unsigned long long)(size - keep), (unsigned long long)keep);
        if (s.count)
            db_info(&lg, "%s: resuming: %lld of %lld samples already there", outp, (long long)s.count, (long long)n);
        if (!(part = malloc(strlen(outp) + 8))) {
            db_err_set(&e, DB_ENOMEM, "out of memory");
            goto out;
        }
        sprintf(part, "%s.part", outp);
        if (open_append(outp, keep, &fd, &e))
            goto out;
    } else if (db_dbt_open_write(&w, outp, NULL, &e)) {
        goto out;
    }

    /* Pending indices of this shard, in order, in runs of consecutive
     * indices of at most --batch: a batch only ever holds noise streams
     * first_index, first_index + 1, ... (txt2img's contract). */
    for (int64_t i = si; i < n;) {
        if (s.have[i]) {
            i += sn;
            continue;
        }
        int64_t k = 1;
        while (k < batch && sn == 1 && i + k < n && !s.have[i + k])
            k++;
        db_txt2img_opts o = {
            .prompt = prompt, .negative = negative, .scheduler = sched, .steps = (int)steps, .guidance = guidance,
            .width = (int)width, .height = (int)height, .n_images = (int)k, .batch = (int)k,
            .seed = (uint64_t)seed, .first_index = (int)i, .clip_skip = 1, .log = &lg, .progress = 0,
            .no_graph = no_graph,
        };
        /* Over ZeroMQ the sample's stream opens before the sampler runs: for
         * the minute it takes, the collector holds an open stream, so if we
         * die it knows a producer was cut mid-sample (and fails as soon as
         * no producer is left) instead of waiting out its timeout. */
        if (w && db_dbt_write_header(w, "prior", hm.buf, hm.len, &e))
            goto out;
        test_hang(&lg, made);
        db_txt2img_out res;
        if (db_txt2img(&sd, &o, png_dir != NULL, 0, &res, &e))
            goto out;
        int bad = 0;
        for (int64_t j = 0; j < k && !bad; j++) {
            const float *lat = res.latents + (size_t)j * per;
            bad = fd >= 0 ? file_sample(fd, outp, part, &p, &hm, i + j, C, lat, &e)
                          : write_sample(w, &p, &hm, i + j, C, lat, j == 0, &e);
            if (!bad && png_dir)
                bad = write_png(png_dir, &p, i + j, res.images + (size_t)j * 3 * hw, model, &e);
            if (!bad) {
                db_info(&lg, "sample %lld done", (long long)(i + j));
                made++;
            }
        }
        db_txt2img_out_free(&res);
        if (bad)
            goto out;
        i += k * sn;
    }
    test_hang(&lg, made);
    if (w) {
        int failed = db_dbt_close(w, &e);
        w = NULL;
        if (failed)
            goto out;
    }
    if (fd >= 0 && close(fd)) {
        fd = -1;
        db_err_errno(&e, outp);
        goto out;
    }
    fd = -1;
    db_info(&lg, "%s: %lld new samples", outp, (long long)made);
    rc = 0;
out:
    if (rc)
        db_error(&lg, "%s", e.msg);
    if (w)
        db_dbt_abort(w, e.msg);
    if (fd >= 0)
        close(fd);
    free(part);
    db_meta_free(&hm);
    free(s.have);
    free(s.key);
    db_sd_close(&sd);
    return rc;
}

/* ---- collect ---- */

/* A stream still open at the collector: the objects that came so far. */
typedef struct open_stream {
    uint8_t id[8];
    uint8_t *buf;
    size_t len, cap;
    int objects;
} open_stream;

static void report_missing(const db_log *lg, const sample_set *s, int64_t shards)
{
    char list[4096] = "";
    size_t len = 0;
    int64_t shown = 0, missing = s->n - s->count;
    for (int64_t i = 0; i < s->n && len + 32 < sizeof list; i++)
        if (!s->have[i]) {
            len += (size_t)snprintf(list + len, sizeof list - len, "%s%lld", shown++ ? ", " : "", (long long)i);
        }
    if (shown < missing)
        snprintf(list + len, sizeof list - len, ", ...");
    db_error(lg, "missing %lld of %lld samples: indices %s", (long long)missing, (long long)s->n, list);
    if (shards > 0) {
        len = 0;
        list[0] = 0;
        for (int64_t sh = 0; sh < shards && len + 32 < sizeof list; sh++) {
            int64_t i = sh;
            while (i < s->n && s->have[i])
                i += shards;
            if (i < s->n)
                len += (size_t)snprintf(list + len, sizeof list - len, " %lld/%lld", (long long)sh, (long long)shards);
        }
        db_error(lg, "incomplete shards (rerun them):%s", list);
    }
}

static int collect_main(int argc, char **argv)
{
    db_log lg = {"db-prior collect", DB_LOG_WARN};
    const char *from = NULL, *outp = NULL;
    int64_t n = 0, shards = 0;
    double timeout = 600;
    int quiet = 0, verbose = 0;
    db_opt opts[] = {
        {"from", 'f', DB_OPT_STR, "ENDPOINT", "ZeroMQ endpoint the producers push to (ipc:// binds by default)", &from,
         NULL, 0},
        {"n", 'n', DB_OPT_INT, "N", "samples in the whole set: stop once 0..N-1 are all here", &n, NULL, 0},
        {"output", 'o', DB_OPT_STR, "FILE", "merged samples (a file resumes like db-prior's; - for stdout)", &outp,
         NULL, 0},
        {"timeout", 't', DB_OPT_FLOAT, "S", "give up when no message comes for S seconds (even from live producers)",
         &timeout, "600", 0},
        {"shards", 0, DB_OPT_INT, "N", "the producers' shard count, to name incomplete shards", &shards, NULL, 0},
        {"quiet", 'q', DB_OPT_FLAG, NULL, "only errors on stderr", &quiet, NULL, 0},
        {"verbose", 'v', DB_OPT_FLAG, NULL, "say which sample arrived", &verbose, NULL, 0},
        {0},
    };
    db_cli cli = {"db-prior collect", "--from ENDPOINT -n N -o FILE [options]",
                  "Receive db-prior samples from any number of producers over ZeroMQ, keep every sample whose "
                  "stream ended with a good trailer (dropping duplicates), and stop when indices 0..N-1 are all "
                  "there. A producer that dies leaves its samples missing: once every producer has disconnected "
                  "while one of them was in the middle of a sample (or, at the latest, after --timeout seconds "
                  "without a message) the collector names the missing indices (and shards) and exits 1. Heartbeats "
                  "(ENDPOINT?heartbeat=MS, default 2000) notice producers whose host or network went away.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos;
    db_err e = {0};
    int rc = db_cli_main(&cli, argc, argv, pos, &npos, &lg);
    if (rc >= 0)
        return rc;
    lg.level = quiet ? DB_LOG_QUIET : verbose ? DB_LOG_INFO : DB_LOG_WARN;
    if (npos || !from || !outp || n < 1 || n > MAX_N || shards < 0 || timeout <= 0 || timeout > 86400) {
        if (npos)
            db_error(&lg, "unexpected argument '%s' (see --help)", pos[0]);
        else
            db_error(&lg, "--from, -n (1..%d) and -o are required; --timeout in (0, 86400] (see --help)", MAX_N);
        return 2;
    }
    db_dbt_target tgt, otgt;
    if (db_dbt_parse_target(&tgt, from, &e) || db_dbt_parse_target(&otgt, outp, &e)) {
        db_error(&lg, "%s", e.msg);
        return 2;
    }
    if (tgt.kind != DB_DBT_ZMQ || otgt.kind == DB_DBT_ZMQ) {
        db_error(&lg, "--from must be a ZeroMQ endpoint (files merge with cat) and -o a file or -");
        return 2;
    }
    sample_set s = {n, calloc((size_t)n, 1), 0, calloc(1, KEY_CAP)};
    open_stream *os = NULL;
    int nos = 0, fd = -1;
    db_zsock *z = NULL;
    rc = 1;
    if (!s.have || !s.key) {
        db_err_set(&e, DB_ENOMEM, "out of memory");
        goto out;
    }
    if (otgt.kind == DB_DBT_FILE) {
        uint64_t keep, size;
        if (scan_existing(&s, outp, &keep, &size, &e) || open_append(outp, keep, &fd, &e))
            goto out;
        if (s.count)
            db_info(&lg, "%s: resuming: %lld of %lld samples already there", outp, (long long)s.count,
                    (long long)n);
    } else {
        fd = STDOUT_FILENO;
    }
    if (db_zsock_open(&z, &tgt, 1, (int)(timeout * 1000), 0, DB_DBT_MAX_OBJECT, &e))
        goto out;
    db_info(&lg, "listening on %s", db_zsock_endpoint(z));
    while (s.count < n) {
        uint8_t id[8];
        const uint8_t *obj;
        size_t len;
        /* nos open streams: producers in the middle of a sample.  When every
         * producer has disconnected while some are open, the recv fails within
         * seconds (the dead ones will never finish them); with none open it
         * waits for more producers up to --timeout. */
        if (db_zsock_recv(z, id, &obj, &len, nos, &e)) {
            db_error(&lg, "%s (%d producer stream%s left unfinished: a producer died or stalled)", e.msg, nos,
                     nos == 1 ? "" : "s");
            for (int k = 0; k < nos; k++)
                db_error(&lg, "cut stream %02x%02x%02x%02x%02x%02x%02x%02x: %d object%s, no trailer%s", os[k].id[0],
                         os[k].id[1], os[k].id[2], os[k].id[3], os[k].id[4], os[k].id[5], os[k].id[6], os[k].id[7],
                         os[k].objects, os[k].objects == 1 ? "" : "s",
                         os[k].objects == 1 ? " (a sample in progress)" : "");
            report_missing(&lg, &s, shards);
            goto done;
        }
        int k = 0;
        while (k < nos && memcmp(os[k].id, id, 8))
            k++;
        if (k == nos) {
            if (nos == DB_DBT_MAX_OPEN_STREAMS) {
                db_err_set(&e, DB_EFORMAT, "%s: more than %d streams open at once", from, nos);
                goto out;
            }
            open_stream *grown = realloc(os, (size_t)(nos + 1) * sizeof *os);
            if (!grown) {
                db_err_set(&e, DB_ENOMEM, "out of memory");
                goto out;
            }
            os = grown;
            memset(&os[nos], 0, sizeof os[nos]);
            memcpy(os[nos++].id, id, 8);
        }
        open_stream *st = &os[k];
        if (st->len + len > st->cap) {
            size_t cap = (st->len + len) * 2;
            uint8_t *b = realloc(st->buf, cap);
            if (!b) {
                db_err_set(&e, DB_ENOMEM, "out of memory");
                goto out;
            }
            st->buf = b;
            st->cap = cap;
        }
        memcpy(st->buf + st->len, obj, len);
        st->len += len;
        st->objects++;
        if (!is_trailer(obj, len) && st->objects < 64)
            continue;
        /* a whole stream: keep it when every check passes, else drop it */
        int dup;
        if (take_streams(&s, st->buf, st->len, from, &dup, &e)) {
            db_warn(&lg, "dropping a stream: %s", e.msg);
        } else if (dup) {
            db_debug(&lg, "dropping a sample that is already here");
        } else if (append_stream(fd, outp, st->buf, st->len, &e)) {
            goto out;
        } else {
            db_info(&lg, "%lld of %lld samples", (long long)s.count, (long long)n);
        }
        free(st->buf);
        os[k] = os[--nos];
    }
    db_info(&lg, "all %lld samples are in %s", (long long)n, outp);
    rc = 0;
    goto done;
out:
    db_error(&lg, "%s", e.msg);
done:
    if (fd >= 0 && fd != STDOUT_FILENO && close(fd) && !rc) {
        db_error(&lg, "%s: %s", outp, strerror(errno));
        rc = 1;
    }
    if (z)
        db_zsock_close(z, 1, NULL);
    for (int k = 0; k < nos; k++)
        free(os[k].buf);
    free(os);
    free(s.have);
    free(s.key);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc > 1 && !strcmp(argv[1], "collect"))
        return collect_main(argc - 1, argv + 1);
    return generate_main(argc, argv);
}
