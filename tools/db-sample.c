/* db-sample: text to image with any SD1.x checkpoint.
 *
 *   db-sample --model M --prompt P [-n N] [--steps 30] [--guidance 7.5]
 *             [--scheduler ddim] [--seed S] [--width 512 --height 512] -o out.png [--grid grid.png]
 *
 * The PNG carries the settings in A1111's "parameters" text chunk. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/core/cli.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/core/log.h"
#include "libcommon/core/version.h"
#include "libcommon/io/dbt.h"
#include "libcommon/io/png.h"
#include "libcommon/sd/txt2img.h"

static db_log lg = {"db-sample", DB_LOG_WARN};

static const char *const sampler_names[][2] = {
    {"ddim", "DDIM"},         {"pndm", "PLMS"},         {"euler", "Euler"}, {"euler_a", "Euler a"},
    {"dpmpp_2m", "DPM++ 2M"}, {"dpmpp_2m_karras", "DPM++ 2M Karras"},   {"ddpm", "DDPM"},
};

static const char *a1111_name(const char *s)
{
    for (size_t i = 0; i < sizeof sampler_names / sizeof sampler_names[0]; i++)
        if (!strcmp(s, sampler_names[i][0]))
            return sampler_names[i][1];
    return s;
}

/* Does pattern hold exactly one printf integer conversion (%d, %03d, ...)
 * and no other '%' but "%%"?  1 yes, 0 no conversion, -1 malformed. */
static int printf_pattern(const char *p)
{
    int conv = 0;
    for (; *p; p++) {
        if (*p != '%')
            continue;
        if (p[1] == '%') {
            p++;
            continue;
        }
        p++;
        while (*p == '0' || *p == '-' || *p == '+' || *p == ' ')
            p++;
        while (*p >= '0' && *p <= '9')
            p++;
        if (*p != 'd' || conv++)
            return -1;
    }
    return conv;
}

/* 'out-%03d.png' -> out-003.png; out.png -> out-0003.png for image 3 of
 * several (a single image keeps the plain name). */
static void image_path(char *buf, size_t n, const char *pattern, int i, int count)
{
    if (printf_pattern(pattern) == 1) {
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
        snprintf(buf, n, pattern, i);
#pragma GCC diagnostic pop
        return;
    }
    if (count == 1) {
        snprintf(buf, n, "%s", pattern);
        return;
    }
    const char *dot = strrchr(pattern, '.'), *slash = strrchr(pattern, '/');
    if (!dot || (slash && dot < slash))
        dot = pattern + strlen(pattern);
    snprintf(buf, n, "%.*s-%04d%s", (int)(dot - pattern), pattern, i, dot);
}

static const char *base_name(const char *p)
{
    size_t n = strlen(p);
    while (n > 1 && p[n - 1] == '/')
        n--;
    const char *s = p + n;
    while (s > p && s[-1] != '/')
        s--;
    return s;
}

/* The record "noise" of a .dbt stream: f32 [N, C, h, w] with N >= n. */
static int read_noise(const char *src, const db_arch *a, int n, int H, int W, float **out, db_err *err)
{
    db_dbt_reader *r;
    db_dbt_record rec;
    *out = NULL;
    if (db_dbt_open_read(&r, src, NULL, err))
        return -1;
    int f = 1 << (a->vae.nlevels - 1), rc, found = 0;
    int64_t want[4] = {n, a->unet.in_channels, H / f, W / f};
    while ((rc = db_dbt_next(r, &rec, err)) == 1) {
        if (strcmp(rec.name, "noise") || found)
            continue; /* the first "noise" record counts */
        found = 1;
        char got[128], need[128];
        if (rec.dtype != DB_F32 || rec.ndim != 4 || rec.shape[0] < n || rec.shape[1] != want[1] ||
            rec.shape[2] != want[2] || rec.shape[3] != want[3]) {
            db_err_set(err, DB_EFORMAT, "%s: record 'noise' is %s %s; this run needs f32 %s (N >= %d)", src,
                       db_dtype_name(rec.dtype), db_shape_str(got, sizeof got, rec.ndim, rec.shape),
                       db_shape_str(need, sizeof need, 4, want), n);
            rc = -1;
            break;
        }
        size_t bytes = (size_t)n * (size_t)(want[1] * want[2] * want[3]) * sizeof(float);
        if (!(*out = malloc(bytes))) {
            rc = db_err_set(err, DB_ENOMEM, "out of memory");
            break;
        }
        memcpy(*out, rec.data, bytes);
    }
    /* read to the end: a truncated or corrupt stream must not be used */
    db_dbt_reader_close(r);
    if (rc < 0 || !found) {
        if (!found && rc == 0)
            db_err_set(err, DB_EFORMAT, "%s: no record named 'noise'", src);
        free(*out);
        *out = NULL;
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *prompt = NULL, *negative = "", *sched = "ddim", *outp = "sample.png";
    const char *latents_out = NULL, *device = "cpu", *config = NULL, *noise_in = NULL, *grid_out = NULL;
    const char *precision = "fp32";
    int64_t n = 1, batch = 1, steps = 50, width = 512, height = 512, seed = 0, threads = 0, clip_skip = 1;
    double guidance = 7.5, eta = 0;
    int quiet = 0, verbose = 0, no_graph = 0;
    db_opt opts[] = {
        {"model", 'm', DB_OPT_STR, "MODEL", "checkpoint: diffusers folder, .safetensors or .ckpt", &model, NULL, 0},
        {"prompt", 'p', DB_OPT_STR, "TEXT", "what to draw; A1111 emphasis (word:1.3) (word) [word] and BREAK",
         &prompt, NULL, 0},
        {"negative-prompt", 0, DB_OPT_STR, "TEXT", "what to steer away from", &negative, "\"\"", 0},
        {"n", 'n', DB_OPT_INT, "N", "number of images", &n, "1", 0},
        {"batch", 0, DB_OPT_INT, "B", "images per UNet call", &batch, "1", 0},
        {"steps", 0, DB_OPT_INT, "N", "sampler steps", &steps, "50", 0},
        {"guidance", 'g', DB_OPT_FLOAT, "X", "classifier-free guidance scale (<= 1: none)", &guidance, "7.5", 0},
        {"scheduler", 0, DB_OPT_STR, "NAME", "ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras or ddpm", &sched,
         "ddim", 0},
        {"eta", 0, DB_OPT_FLOAT, "X", "DDIM eta (0: deterministic)", &eta, "0", 0},
        {"width", 'W', DB_OPT_INT, "PX", "image width, a multiple of 8", &width, "512", 0},
        {"height", 'H', DB_OPT_INT, "PX", "image height, a multiple of 8", &height, "512", 0},
        {"seed", 's', DB_OPT_INT, "S", "noise seed; image i uses noise stream i", &seed, "0", 0},
        {"clip-skip", 0, DB_OPT_INT, "K", "1: last text-encoder layer; 2: penultimate (A1111)", &clip_skip, "1", 0},
        {"output", 'o', DB_OPT_STR, "FILE.png", "output; a printf pattern like 'out-%03d.png' numbers images, "
         "else with -n > 1 FILE-0000.png, FILE-0001.png, ...", &outp, "sample.png", 0},
        {"grid", 0, DB_OPT_STR, "FILE.png", "also write all images as one contact sheet: ceil(sqrt(n)) columns, "
         "images left to right then top to bottom, empty cells black, no padding", &grid_out, NULL, 0},
        {"noise", 0, DB_OPT_STR, "STREAM", "initial latents from a .dbt stream (record 'noise', f32 [N,C,H/8,W/8]) "
         "instead of seeded noise", &noise_in, NULL, 0},
        {"latents-out", 0, DB_OPT_STR, "STREAM", "also write the final latents as a .dbt stream (path, - or endpoint)",
         &latents_out, NULL, 0},
        {"config", 0, DB_OPT_STR, "DIR", "diffusers-style config folder for a single-file model", &config, NULL, 0},
        {"threads", 0, DB_OPT_INT, "N", "worker threads (0: all cores)", &threads, "0", 0},
        {"device", 0, DB_OPT_STR, "cpu|cuda[:N]", "compute device (cpu-strict: the CPU with a GPU's memory discipline, for tests)", &device, "cpu", 0},
        {"precision", 0, DB_OPT_STR, "fp32|bf16|fp16", "compute type of the matmuls, convolutions and attention "
         "(autocast; weights stay fp32; on the CPU an emulation, slower)", &precision, "fp32", 0},
        {"no-graph", 0, DB_OPT_FLAG, NULL, "on a GPU, launch each denoising step's kernels one by one instead of "
         "replaying the step as a CUDA graph from the second step on (same results; for debugging)", &no_graph, NULL, 0},
        {"quiet", 'q', DB_OPT_FLAG, NULL, "only errors on stderr", &quiet, NULL, 0},
        {"verbose", 'v', DB_OPT_FLAG, NULL, "more detail on stderr", &verbose, NULL, 0},
        {0},
    };
    db_cli cli = {"db-sample", "--model MODEL --prompt TEXT [options]",
                  "Text to image with classifier-free guidance, computing what diffusers' StableDiffusionPipeline "
                  "computes. Image i of a run with --seed S uses noise stream i, so '-n 4 --seed S' gives image 2 "
                  "the same noise as the third image of any run with seed S. Settings go into the PNG's "
                  "'parameters' text chunk (A1111 format).",
                  opts, NULL};
    char *pos[argc + 1];
    int npos;
    db_err e = {0};
    int rc = db_cli_main(&cli, argc, argv, pos, &npos, &lg);
    if (rc >= 0)
        return rc;
    lg.level = quiet ? DB_LOG_QUIET : verbose ? DB_LOG_DEBUG : DB_LOG_WARN;
    if (npos || !model || !prompt) {
        db_error(&lg, npos ? "unexpected argument '%s'" : "--model and --prompt are required (see --help)",
                 npos ? pos[0] : "");
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
    if (n < 1 || n > 100000 || batch < 1 || steps < 1 || steps > 10000 || width < 8 || height < 8 || width > 8192 ||
        height > 8192 || threads < 0 || clip_skip < 1) {
        db_error(&lg, "out-of-range value among -n, --batch, --steps, --width, --height, --threads, --clip-skip");
        return 2;
    }
    if (width % 8 || height % 8) {
        db_error(&lg, "--width %lld --height %lld: both must be multiples of 8", (long long)width, (long long)height);
        return 2;
    }
    if (strlen(outp) < 5 || strcmp(outp + strlen(outp) - 4, ".png") || printf_pattern(outp) < 0) {
        db_error(&lg, "--output %s: the file name must end in .png and may hold one %%d-style number", outp);
        return 2;
    }
    int64_t grid_cols = 1, grid_rows = 1;
    if (grid_out) {
        if (strlen(grid_out) < 5 || strcmp(grid_out + strlen(grid_out) - 4, ".png")) {
            db_error(&lg, "--grid %s: the file name must end in .png", grid_out);
            return 2;
        }
        while (grid_cols * grid_cols < n)
            grid_cols++;
        grid_rows = (n + grid_cols - 1) / grid_cols;
        if (grid_cols * width > (1 << 20) || grid_rows * height > (1 << 20)) {
            db_error(&lg, "--grid: a %lldx%lld sheet of %lldx%lld images is too large for a PNG (at most %d pixels a "
                     "side)", (long long)grid_cols, (long long)grid_rows, (long long)width, (long long)height, 1 << 20);
            return 2;
        }
    }
    db_sd sd;
    db_model_opts mo = {config, &lg};
    if (db_sd_open_device(&sd, model, &mo, device, (int)threads, &e)) {
        db_error(&lg, "%s", e.msg);
        return 1;
    }
    db_ctx_set_precision(sd.ctx, (db_precision)prec);
    char hash[17];
    if (db_model_hash(&sd.model, hash, &e)) {
        db_error(&lg, "%s", e.msg);
        db_sd_close(&sd);
        return 1;
    }
    db_txt2img_opts o = {
        .prompt = prompt, .negative = negative, .scheduler = sched, .steps = (int)steps, .guidance = guidance,
        .eta = eta, .width = (int)width, .height = (int)height, .n_images = (int)n,
        .batch = (int)(batch < n ? batch : n), .seed = (uint64_t)seed, .clip_skip = (int)clip_skip, .log = &lg,
        .progress = !quiet, .no_graph = no_graph,
    };
    float *noise = NULL;
    if (noise_in && read_noise(noise_in, &sd.model.arch, (int)n, (int)height, (int)width, &noise, &e)) {
        db_error(&lg, "%s", e.msg);
        db_sd_close(&sd);
        return 1;
    }
    o.init_latents = noise;
    db_txt2img_out out;
    int failed = db_txt2img(&sd, &o, 1, 0, &out, &e);
    free(noise);
    if (failed) {
        db_error(&lg, "%s", e.msg);
        db_sd_close(&sd);
        return 1;
    }
    rc = 0;
    size_t hw = (size_t)width * (size_t)height;
    uint8_t *rgb = malloc(hw * 3), *grid = NULL;
    size_t grid_w = (size_t)(grid_cols * width), grid_h = (size_t)(grid_rows * height);
    char params0[8192] = "";
    if (grid_out && rgb && !(grid = calloc(grid_w * grid_h, 3))) {
        free(rgb);
        rgb = NULL; /* reported below */
    }
    for (int i = 0; i < n && rgb && !rc; i++) {
        char path[4096], params[8192];
        image_path(path, sizeof path, outp, i, (int)n);
        snprintf(params, sizeof params,
                 "%s\n%s%s%sSteps: %lld, Sampler: %s, CFG scale: %g, Seed: %lld, Size: %lldx%lld, Model hash: %.10s, "
                 "Model: %s, Clip skip: %lld, Noise: philox stream %d, Version: dreambooth-c %s",
                 prompt, negative[0] ? "Negative prompt: " : "", negative, negative[0] ? "\n" : "", (long long)steps,
                 a1111_name(sched), guidance, (long long)seed, (long long)width, (long long)height, hash,
                 base_name(model), (long long)clip_skip, i, DB_VERSION);
        const char *text[] = {"parameters", params, "Software", "dreambooth-c " DB_VERSION, NULL};
        db_image_to_rgb8(rgb, out.images + (size_t)i * 3 * hw, (int)height, (int)width);
        if (i == 0)
            memcpy(params0, params, sizeof params0);
        if (grid) { /* cell (i % cols, i / cols) */
            size_t x0 = (size_t)(i % grid_cols) * (size_t)width, y0 = (size_t)(i / grid_cols) * (size_t)height;
            for (size_t y = 0; y < (size_t)height; y++)
                memcpy(grid + ((y0 + y) * grid_w + x0) * 3, rgb + y * (size_t)width * 3, (size_t)width * 3);
        }
        if (db_png_write(path, rgb, (int)width, (int)height, text, &e)) {
            db_error(&lg, "%s", e.msg);
            rc = 1;
        } else {
            db_info(&lg, "wrote %s", path);
        }
    }
    if (grid && !rc) { /* A1111's grids carry the first image's parameters */
        const char *text[] = {"parameters", params0, "Software", "dreambooth-c " DB_VERSION, NULL};
        if (db_png_write(grid_out, grid, (int)grid_w, (int)grid_h, text, &e)) {
            db_error(&lg, "%s", e.msg);
            rc = 1;
        } else {
            db_info(&lg, "wrote %s (%lldx%lld images)", grid_out, (long long)grid_cols, (long long)grid_rows);
        }
    }
    free(grid);
    if (!rgb) {
        db_error(&lg, "out of memory");
        rc = 1;
    }
    free(rgb);
    if (!rc && latents_out) {
        db_dbt_writer *w = NULL;
        db_meta m;
        db_meta_init(&m);
        db_meta_put_str(&m, "prompt", prompt);
        db_meta_put_str(&m, "negative_prompt", negative);
        db_meta_put_str(&m, "model_hash", hash);
        db_meta_put_str(&m, "scheduler", sched);
        db_meta_put_int(&m, "steps", steps);
        db_meta_put_float(&m, "guidance", guidance);
        db_meta_put_int(&m, "seed", seed);
        db_meta_put_float(&m, "scaling_factor", sd.model.arch.vae.scaling_factor);
        db_meta_put_str(&m, "tool", "db-sample " DB_VERSION);
        int C = sd.model.arch.unet.in_channels;
        int64_t shape[3] = {C, height / 8, width / 8};
        size_t per = (size_t)C * (size_t)(height / 8) * (size_t)(width / 8);
        if (db_meta_finish(&m, &e) || db_dbt_open_write(&w, latents_out, NULL, &e) ||
            db_dbt_write_header(w, "latents", m.buf, m.len, &e))
            rc = 1;
        for (int i = 0; i < n && !rc; i++) {
            db_meta r;
            db_meta_init(&r);
            db_meta_put_int(&r, "index", i);
            db_meta_put_int(&r, "seed", seed);
            char name[32];
            snprintf(name, sizeof name, "latents/%d", i);
            if (db_meta_finish(&r, &e) ||
                db_dbt_write_record(w, name, DB_F32, 3, shape, out.latents + (size_t)i * per, r.buf, r.len, &e))
                rc = 1;
            db_meta_free(&r);
        }
        if (!rc && db_dbt_close(w, &e))
            rc = 1;
        else if (rc && w)
            db_dbt_abort(w, e.msg);
        if (rc)
            db_error(&lg, "%s: %s", latents_out, e.msg);
        db_meta_free(&m);
    }
    db_txt2img_out_free(&out);
    db_sd_close(&sd);
    return rc;
}
