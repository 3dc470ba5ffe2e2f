/* db-prep: subject photos -> VAE latent distributions for db-train.
 *
 *   db-prep --model M [--size 512] [--crop center|smart|random] [--flip]
 *           (--caption TEXT | --caption-from sidecar|filename) IMAGE|DIR... -o instance.dbt
 *
 * Each photo is decoded (libcommon/io/image.h), scaled so its short side is
 * --size, cropped to a square, and each crop (and its mirror with --flip) is
 * VAE-encoded into one record "crop/N": f32 [2, Z, S/f, S/f] holding the
 * posterior mean then logvar, so db-train can draw a fresh latent each step
 * as diffusers does.  man/db-prep.1 is the contract for that layout. */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <vips/vips.h>
#include <xxhash.h>

#include "kernels/ops.h"
#include "libcommon/core/cli.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/core/log.h"
#include "libcommon/core/version.h"
#include "libcommon/io/dbt.h"
#include "libcommon/io/image.h"
#include "libcommon/io/model.h"
#include "libcommon/io/png.h"
#include "libcommon/sd/vae.h"

static db_log lg = {"db-prep", DB_LOG_WARN};

/* libvips reports decoder trouble twice: as the error we turn into a message
 * naming the file, and as glib warnings; the second copy is noise. */
static void quiet_glib(const char *domain, GLogLevelFlags level, const char *msg, void *user)
{
    (void)domain, (void)level, (void)msg, (void)user;
}

/* File names a directory contributes: the usual photo extensions.  A file
 * named on the command line is tried whatever its name (content decides). */
static int image_ext(const char *name)
{
    static const char *const ext[] = {".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".tif", ".tiff",
                                      ".heic", ".heif", ".avif"};
    const char *dot = strrchr(name, '.');
    for (size_t i = 0; dot && i < sizeof ext / sizeof ext[0]; i++)
        if (!strcasecmp(dot, ext[i]))
            return 1;
    return 0;
}

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

typedef struct strlist {
    char **v;
    size_t n, cap;
} strlist;

static int push(strlist *l, char *s)
{
    if (!s)
        return -1;
    if (l->n == l->cap) {
        size_t cap = l->cap ? 2 * l->cap : 16;
        char **nv = realloc(l->v, cap * sizeof *nv);
        if (!nv) {
            free(s);
            return -1;
        }
        l->v = nv;
        l->cap = cap;
    }
    l->v[l->n++] = s;
    return 0;
}

/* Expand the arguments: files as given, directories as their image files in
 * byte order (sorted, so a listing's order never changes the output). */
static int collect(strlist *out, char **args, int n, db_err *err)
{
    for (int i = 0; i < n; i++) {
        if (!db_is_dir(args[i])) {
            if (push(out, strdup(args[i])))
                return db_err_set(err, DB_ENOMEM, "out of memory");
            continue;
        }
        DIR *d = opendir(args[i]);
        if (!d)
            return db_err_errno(err, args[i]);
        strlist names = {0};
        struct dirent *de;
        while ((de = readdir(d)))
            if (de->d_name[0] != '.' && image_ext(de->d_name) && push(&names, strdup(de->d_name))) {
                closedir(d);
                return db_err_set(err, DB_ENOMEM, "out of memory");
            }
        closedir(d);
        if (names.n)
            qsort(names.v, names.n, sizeof *names.v, cmp_str);
        int bad = 0;
        for (size_t j = 0; j < names.n; j++) {
            if (!bad && push(out, db_path_join(args[i], names.v[j])))
                bad = 1;
            free(names.v[j]);
        }
        free(names.v);
        if (bad)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        if (!names.n)
            db_warn(&lg, "%s: no image files (.jpg .png .webp ...) in this directory", args[i]);
    }
    return 0;
}

/* The path without its extension (a dot in a directory name is not one). */
static char *stem(const char *path)
{
    const char *dot = strrchr(path, '.'), *slash = strrchr(path, '/');
    size_t n = dot && (!slash || dot > slash) ? (size_t)(dot - path) : strlen(path);
    return strndup(path, n);
}

/* Caption from NAME.txt or NAME.caption (first found), trimmed. */
static char *sidecar_caption(const char *path, db_err *err)
{
    static const char *const exts[] = {".txt", ".caption"};
    char *s = stem(path);
    if (!s) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        return NULL;
    }
    size_t sl = strlen(s);
    char *name = malloc(sl + 16), *text = NULL;
    for (size_t i = 0; name && i < 2 && !text; i++) {
        snprintf(name, sl + 16, "%s%s", s, exts[i]);
        size_t len;
        if (!db_exists(name))
            continue;
        if (db_read_file(name, 64 * 1024, &text, &len, err)) {
            free(s);
            free(name);
            return NULL;
        }
        while (len && (text[len - 1] == '\n' || text[len - 1] == '\r' || text[len - 1] == ' ' ||
                       text[len - 1] == '\t'))
            text[--len] = 0;
        if (strlen(text) != len || !len) {
            db_err_set(err, DB_EFORMAT, "%s: caption file is empty or holds a NUL byte", name);
            free(text);
            text = NULL;
            break;
        }
    }
    if (!text && !err->msg[0])
        db_err_set(err, DB_EUSAGE, "%s: no caption: neither %s.txt nor %s.caption exists", path, s, s);
    free(s);
    free(name);
    return text;
}

/* Caption from the file name: directory and extension dropped, '_' -> ' '. */
static char *filename_caption(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *c = stem(slash ? slash + 1 : path);
    for (char *p = c; p && *p; p++)
        if (*p == '_')
            *p = ' ';
    return c;
}

/* splitmix64: the documented PRNG of random crops.  Crop k of input file i
 * with --seed S takes its offset from mix(mix(mix(S) ^ i) ^ k) modulo the
 * number of possible offsets, so it depends on nothing else. */
static uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

typedef struct prep {
    const char *caption, *caption_from, *crop, *preview, *model_name, *device;
    int64_t size, crops, seed;
    int flip, skip_bad, quiet;
    db_vae *vae;
    int Z, f;
    db_dbt_writer *w;
    int64_t records;
    float *chw, *mean, *logvar, *rec; /* (3,S,S) (Z,s,s) (Z,s,s) (2,Z,s,s) */
    db_ctx *ctx;                      /* the VAE's device */
    db_precision precision;           /* its compute type (--precision) */
    float *dchw, *dmean, *dlogvar;    /* chw, mean, logvar in the ctx's memory */
    uint8_t *crop_px;                 /* (S,S,3) */
    XXH128_hash_t *seen;              /* hashes of decoded photos: duplicates */
    size_t nseen;
} prep;

/* One crop (flipped or not) -> VAE -> record, plus the optional preview. */
static int emit(prep *p, const db_rgb8 *rs, const char *src, const char *caption, int x, int y, int ci, int flip,
                db_err *err)
{
    int S = (int)p->size, s = S / p->f;
    size_t zs = (size_t)p->Z * s * s;
    db_image_crop(p->crop_px, rs, x, y, S, flip);
    db_image_to_chw(p->chw, p->crop_px, S, S);
    /* through the VAE's device (on the CPU the copies are plain memcpy) */
    if (db_ctx_copy(p->ctx, p->dchw, p->chw, (size_t)3 * S * S * sizeof(float), DB_COPY_H2D) ||
        db_vae_encode(p->vae, p->dmean, p->dlogvar, p->dchw, 1, S, S, err) ||
        db_ctx_copy(p->ctx, p->rec, p->dmean, zs * sizeof(float), DB_COPY_D2H) ||
        db_ctx_copy(p->ctx, p->rec + zs, p->dlogvar, zs * sizeof(float), DB_COPY_D2H)) {
        if (!err->code)
            db_err_set(err, p->ctx->err.code, "%s", p->ctx->err.msg);
        return db_err_prefix(err, "%s: VAE encode", src);
    }
    char name[64];
    snprintf(name, sizeof name, "crop/%lld", (long long)p->records);
    db_meta m;
    db_meta_init(&m);
    db_meta_put_str(&m, "caption", caption);
    db_meta_put_str(&m, "source", src);
    db_meta_put_array(&m, "crop_box");
    db_meta_put_int(&m, NULL, x);
    db_meta_put_int(&m, NULL, y);
    db_meta_put_int(&m, NULL, S);
    db_meta_put_int(&m, NULL, S);
    db_meta_end(&m);
    db_meta_put_array(&m, "resized");
    db_meta_put_int(&m, NULL, rs->w);
    db_meta_put_int(&m, NULL, rs->h);
    db_meta_end(&m);
    db_meta_put_bool(&m, "flip", flip);
    db_meta_put_int(&m, "crop_index", ci);
    int64_t shape[4] = {2, p->Z, s, s};
    int rc = db_meta_finish(&m, err) || db_dbt_write_record(p->w, name, DB_F32, 4, shape, p->rec, m.buf, m.len, err);
    db_meta_free(&m);
    if (rc)
        return -1;
    if (p->preview) {
        char path[4096], box[64];
        snprintf(path, sizeof path, "%s/crop-%04lld.png", p->preview, (long long)p->records);
        snprintf(box, sizeof box, "%d,%d,%d,%d%s", x, y, S, S, flip ? " flipped" : "");
        const char *text[] = {"Title", caption, "Source", src, "Crop", box, NULL};
        if (db_png_write(path, p->crop_px, S, S, text, err))
            return -1;
    }
    p->records++;
    return 0;
}

/* Everything for one photo.  Returns 0 done, 1 skipped (duplicate), -1 a bad
 * photo or caption (the caller decides between failing and --skip-bad), -2 a
 * failure that no skipping can fix (VAE, output, memory). */
static int do_image(prep *p, const char *path, int index, int total, db_err *err)
{
    db_rgb8 im, rs = {0};
    db_image_info info;
    char *caption = NULL;
    int rc = -1;
    if (p->caption)
        caption = strdup(p->caption);
    else if (!strcmp(p->caption_from, "sidecar"))
        caption = sidecar_caption(path, err);
    else
        caption = filename_caption(path);
    if (!caption) {
        if (!err->msg[0])
            db_err_set(err, DB_ENOMEM, "out of memory");
        return -1;
    }
    if (db_image_load(&im, &info, path, 0, err)) {
        free(caption);
        return -1;
    }
    if (info.icc < 0)
        db_warn(&lg, "%s: unusable ICC profile ignored; colours assumed sRGB", path);
    /* Exact duplicates (same decoded pixels) would weigh a photo twice. */
    XXH128_hash_t h = XXH3_128bits(im.px, (size_t)im.w * im.h * 3);
    h.low64 ^= (uint64_t)im.w << 32 | (uint32_t)im.h;
    for (size_t i = 0; i < p->nseen; i++)
        if (XXH128_isEqual(p->seen[i], h)) {
            db_warn(&lg, "%s: same pixels as an earlier photo; skipped", path);
            rc = 1;
            goto done;
        }
    XXH128_hash_t *ns = realloc(p->seen, (p->nseen + 1) * sizeof *ns);
    if (!ns) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto done;
    }
    p->seen = ns;
    p->seen[p->nseen++] = h;

    int up = 0;
    if (db_image_resize_short(&rs, &im, (int)p->size, &up, err)) {
        db_err_prefix(err, "%s", path);
        goto done;
    }
    if (up)
        db_warn(&lg, "%s: %dx%d is smaller than --size %lld: upscaled (blurrier than a larger photo)", path, im.w,
                im.h, (long long)p->size);
    int S = (int)p->size;
    int64_t before = p->records;
    for (int k = 0; k < p->crops; k++) {
        int x = (rs.w - S) / 2, y = (rs.h - S) / 2;
        if (!strcmp(p->crop, "smart")) {
            if (db_image_smartcrop(&x, &y, &rs, S, err)) {
                db_err_prefix(err, "%s", path);
                goto done;
            }
        } else if (!strcmp(p->crop, "random")) {
            uint64_t r = mix(mix(mix((uint64_t)p->seed) ^ (uint64_t)index) ^ (uint64_t)k);
            x = (int)(r % (uint64_t)(rs.w - S + 1));
            y = (int)(r % (uint64_t)(rs.h - S + 1));
        }
        if (emit(p, &rs, path, caption, x, y, k, 0, err) || (p->flip && emit(p, &rs, path, caption, x, y, k, 1, err))) {
            rc = -2;
            goto done;
        }
    }
    if (!p->quiet)
        fprintf(stderr, "db-prep: [%d/%d] %s: %dx%d -> %dx%d, %lld record%s\n", index + 1, total, path, im.w, im.h,
                rs.w, rs.h, (long long)(p->records - before), p->records - before == 1 ? "" : "s");
    rc = 0;
done:
    db_image_free(&rs);
    db_image_free(&im);
    free(caption);
    return rc;
}

static const char *base_name(const char *path)
{
    size_t n = strlen(path);
    while (n > 1 && path[n - 1] == '/')
        n--;
    const char *s = path + n;
    while (s > path && s[-1] != '/')
        s--;
    return s;
}

static int run(prep *p, db_model *model, strlist *files, const char *outp, int64_t threads, db_err *err)
{
    db_ctx *ctx = NULL;
    int rc = 1;
    char hash[17];
    if (db_model_hash(model, hash, err) || db_ctx_create_device(&ctx, p->device, (int)threads, err))
        return 1;
    p->ctx = ctx;
    db_ctx_set_precision(ctx, p->precision);
    if (db_vae_create(&p->vae, ctx, model, err))
        goto out;
    p->f = db_vae_factor(p->vae);
    p->Z = model->arch.vae.latent_channels;
    if (p->size % p->f) {
        db_err_set(err, DB_EUSAGE, "--size %lld: must be a multiple of %d (the VAE's factor)", (long long)p->size,
                   p->f);
        rc = 2;
        goto out;
    }
    int S = (int)p->size, s = S / p->f;
    size_t zs = (size_t)p->Z * s * s;
    p->chw = malloc((size_t)3 * S * S * sizeof(float));
    p->mean = malloc(zs * sizeof(float));
    p->logvar = malloc(zs * sizeof(float));
    p->rec = malloc(2 * zs * sizeof(float));
    p->crop_px = malloc((size_t)3 * S * S);
    p->dchw = db_ctx_alloc(ctx, (size_t)3 * S * S * sizeof(float));
    p->dmean = db_ctx_alloc(ctx, zs * sizeof(float));
    p->dlogvar = db_ctx_alloc(ctx, zs * sizeof(float));
    if (!p->chw || !p->mean || !p->logvar || !p->rec || !p->crop_px || !p->dchw || !p->dmean || !p->dlogvar) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    if (p->preview && mkdir(p->preview, 0777) && errno != EEXIST) {
        db_err_errno(err, p->preview);
        goto out;
    }
    db_meta m;
    db_meta_init(&m);
    db_meta_put_str(&m, "model", p->model_name);
    db_meta_put_str(&m, "model_hash", hash);
    db_meta_put_float(&m, "scaling_factor", model->arch.vae.scaling_factor);
    db_meta_put_int(&m, "size", p->size);
    db_meta_put_int(&m, "latent_channels", p->Z);
    db_meta_put_int(&m, "vae_factor", p->f);
    db_meta_put_str(&m, "crop", p->crop);
    db_meta_put_int(&m, "crops_per_image", p->crops);
    db_meta_put_bool(&m, "flip", p->flip);
    db_meta_put_int(&m, "seed", p->seed);
    db_meta_put_str(&m, "layout", "[mean, logvar]");
    db_meta_put_str(&m, "tool", "db-prep " DB_VERSION);
    int bad = db_meta_finish(&m, err) || db_dbt_open_write(&p->w, outp, NULL, err) ||
              db_dbt_write_header(p->w, "instance", m.buf, m.len, err);
    db_meta_free(&m);
    if (bad)
        goto out;
    int used = 0;
    for (size_t i = 0; i < files->n; i++) {
        db_err_clear(err);
        int r = do_image(p, files->v[i], (int)i, (int)files->n, err);
        if (r == -1 && p->skip_bad && err->code != DB_ENOMEM) {
            db_warn(&lg, "%s; skipped (--skip-bad)", err->msg);
            continue;
        }
        if (r < 0)
            goto out;
        used += r == 0;
    }
    if (!used) {
        db_err_set(err, DB_EUSAGE, "no usable photos among %zu input%s", files->n, files->n == 1 ? "" : "s");
        goto out;
    }
    db_err_clear(err);
    if (db_dbt_close(p->w, err)) {
        p->w = NULL;
        db_err_prefix(err, "%s", outp);
        goto out;
    }
    p->w = NULL;
    rc = 0;
out:
    if (p->w) {
        db_dbt_abort(p->w, err->msg);
        p->w = NULL;
    }
    db_vae_free(p->vae);
    if (ctx) {
        db_ctx_free(ctx, p->dchw);
        db_ctx_free(ctx, p->dmean);
        db_ctx_free(ctx, p->dlogvar);
    }
    p->dchw = p->dmean = p->dlogvar = NULL;
    p->ctx = NULL;
    db_ctx_destroy(ctx);
    return rc;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *outp = NULL, *device = "cpu", *precision = "fp32";
    prep p = {.crop = "center", .size = 512, .crops = 1};
    int64_t threads = 0;
    int verbose = 0;
    db_opt opts[] = {
        {"model", 'm', DB_OPT_STR, "MODEL", "checkpoint whose VAE encodes the crops", &model, NULL, 0},
        {"output", 'o', DB_OPT_STR, "STREAM", "instance stream: a path, - or a ZeroMQ endpoint", &outp, NULL, 0},
        {"size", 0, DB_OPT_INT, "PX", "crop side; the short side is scaled to it (a multiple of 8)", &p.size, "512",
         0},
        {"crop", 0, DB_OPT_STR, "center|smart|random", "where the square crop goes", &p.crop, "center", 0},
        {"crops-per-image", 0, DB_OPT_INT, "K", "random crops per photo (--crop random)", &p.crops, "1", 0},
        {"flip", 0, DB_OPT_FLAG, NULL, "also write each crop mirrored left-right", &p.flip, NULL, 0},
        {"caption", 0, DB_OPT_STR, "TEXT", "one caption for every photo, e.g. \"a photo of sks dog\"", &p.caption,
         NULL, 0},
        {"caption-from", 0, DB_OPT_STR, "sidecar|filename",
         "per-photo caption from NAME.txt / NAME.caption, or from the file name", &p.caption_from, NULL, 0},
        {"preview", 0, DB_OPT_STR, "DIR", "also write every crop as DIR/crop-NNNN.png", &p.preview, NULL, 0},
        {"seed", 's', DB_OPT_INT, "S", "seed of the random crops", &p.seed, "0", 0},
        {"skip-bad", 0, DB_OPT_FLAG, NULL, "skip unreadable photos with a warning instead of failing", &p.skip_bad,
         NULL, 0},
        {"threads", 0, DB_OPT_INT, "N", "worker threads (0: all cores)", &threads, "0", 0},
        {"device", 0, DB_OPT_STR, "cpu|cuda[:N]", "compute device (cpu-strict: the CPU with a GPU's memory discipline, for tests)", &device, "cpu", 0},
        {"precision", 0, DB_OPT_STR, "fp32|bf16|fp16", "compute type of the VAE encoder's convolutions and "
         "attention (autocast; weights stay fp32; on the CPU an emulation, slower)", &precision, "fp32", 0},
        {"quiet", 'q', DB_OPT_FLAG, NULL, "only errors on stderr", &p.quiet, NULL, 0},
        {"verbose", 'v', DB_OPT_FLAG, NULL, "more detail on stderr", &verbose, NULL, 0},
        {0},
    };
    db_cli cli = {"db-prep", "--model MODEL (--caption TEXT | --caption-from sidecar|filename) IMAGE|DIR... -o FILE",
                  "Decode subject photos (JPEG, PNG, WebP, ...; EXIF orientation and ICC profiles applied), scale the "
                  "short side to --size, crop squares, and VAE-encode each crop into one record 'crop/N' of f32 "
                  "[2, Z, S/8, S/8]: the posterior mean then logvar.  Identical inputs and options give identical "
                  "bytes.",
                  opts, NULL};
    char *pos[argc + 1];
    int npos;
    db_err e = {0};
    int rc = db_cli_main(&cli, argc, argv, pos, &npos, &lg);
    if (rc >= 0)
        return rc;
    lg.level = p.quiet ? DB_LOG_QUIET : verbose ? DB_LOG_DEBUG : DB_LOG_WARN;
    const char *why = NULL;
    if (!model || !outp || !npos)
        why = "--model, -o and at least one IMAGE or DIR are required";
    else if (!p.caption == !p.caption_from)
        why = "give the caption one way: --caption TEXT or --caption-from sidecar|filename";
    else if (p.caption_from && strcmp(p.caption_from, "sidecar") && strcmp(p.caption_from, "filename"))
        why = "--caption-from takes sidecar or filename";
    else if (strcmp(p.crop, "center") && strcmp(p.crop, "smart") && strcmp(p.crop, "random"))
        why = "--crop takes center, smart or random";
    else if (p.crops < 1 || p.crops > 1000 || (p.crops > 1 && strcmp(p.crop, "random")))
        why = "--crops-per-image: 1 to 1000, and above 1 only with --crop random";
    else if (p.size < 8 || p.size > 4096 || threads < 0)
        why = "--size must lie in [8, 4096] and --threads be >= 0";
    else if (db_device_check(device, &e))
        why = e.msg;
    const int prec = db_precision_parse(precision);
    char pwhy[200];
    if (!why && prec < 0) {
        snprintf(pwhy, sizeof pwhy, "--precision %s: unknown precision (fp32, bf16 or fp16)", precision);
        why = pwhy;
    }
    p.precision = prec < 0 ? DB_PREC_F32 : (db_precision)prec;
    if (why) {
        db_error(&lg, "%s (see --help)", why);
        return 2;
    }
    if (VIPS_INIT(argv[0])) {
        db_error(&lg, "cannot start libvips: %s", vips_error_buffer());
        return 1;
    }
    if (!verbose)
        g_log_set_handler("VIPS", G_LOG_LEVEL_WARNING, quiet_glib, NULL);
    /* Results never depend on vips' cache; keeping none bounds memory. */
    vips_cache_set_max(0);
    if (threads)
        vips_concurrency_set((int)threads);
    p.model_name = base_name(model);

    strlist files = {0};
    db_model m;
    db_model_opts mo = {NULL, &lg};
    rc = 1;
    if (collect(&files, pos, npos, &e)) {
        db_error(&lg, "%s", e.msg);
    } else if (!files.n) {
        db_error(&lg, "no photos to prepare");
    } else if (db_model_open(&m, model, &mo, &e)) {
        db_error(&lg, "%s", e.msg);
    } else {
        p.device = device;
        rc = run(&p, &m, &files, outp, threads, &e);
        if (rc)
            db_error(&lg, "%s", e.msg);
        db_model_close(&m);
    }
    for (size_t i = 0; i < files.n; i++)
        free(files.v[i]);
    free(files.v);
    free(p.chw);
    free(p.mean);
    free(p.logvar);
    free(p.rec);
    free(p.crop_px);
    free(p.seen);
    vips_shutdown();
    return rc;
}
