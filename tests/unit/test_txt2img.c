/* The whole pipeline against diffusers' StableDiffusionPipeline on the tiny
 * model: given its initial latents, DDIM 10 steps, guidance 7.5 and a
 * negative prompt, every step's latents, the final latents and the decoded
 * image within relative L2 1e-4; and from every layout of the weights.
 * On the device of $DB_TEST_DEVICE (tap.h; cpu by default), through
 * db_sd_open_device: the pipeline's options and outputs are host memory
 * (txt2img.h stages them), so nothing here is copied. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/io/safetensors.h"
#include "libcommon/sd/txt2img.h"
#include "tap.h"

static const float *ref(const db_tindex *ix, const char *name, size_t n)
{
    long k = db_tindex_find(ix, name);
    if (k < 0 || ix->v[k].nbytes != n * sizeof(float)) {
        tap_diag("reference '%s' missing or of another size", name);
        return NULL;
    }
    return ix->v[k].ptr;
}

static void compare(const char *what, const float *got, const float *want, size_t n, double tol)
{
    tap_cmp c = {INFINITY, NAN, 0};
    if (want && got)
        c = tap_compare(got, want, n);
    tap_ok(c.rel <= tol, "%s: %s: rel L2 %.3g (max abs %.3g) <= %g", tap_device(), what, c.rel, c.maxabs, tol);
}

static void run(const char *model, const db_tindex *ix)
{
    db_sd sd;
    db_err e = {0};
    if (!tap_ok(!db_sd_open_device(&sd, tap_path(model), NULL, tap_device(), 0, &e), "open %s on %s: %s", model,
                tap_device(), e.msg))
        return;
    size_t per = 4 * 16 * 16;
    db_txt2img_opts o = {
        .prompt = "a photo of sks dog", .negative = "blurry, low quality, deformed", .scheduler = "ddim",
        .steps = 10, .guidance = 7.5, .width = 128, .height = 128, .n_images = 1, .batch = 1,
        .init_latents = ref(ix, "init_latents", per),
    };
    db_txt2img_out out;
    int rc = db_txt2img(&sd, &o, 1, 1, &out, &e);
    if (tap_ok(!rc, "%s: txt2img ran: %s", model, e.msg)) {
        char what[256];
        snprintf(what, sizeof what, "%s: prompt embeddings", model);
        compare(what, out.prompt_embeds, ref(ix, "prompt_embeds", 77 * 32), 77 * 32, 1e-4);
        snprintf(what, sizeof what, "%s: negative prompt embeddings", model);
        compare(what, out.negative_embeds, ref(ix, "negative_prompt_embeds", 77 * 32), 77 * 32, 1e-4);
        const float *steps = ref(ix, "step_latents", 10 * per);
        double worst = 0;
        for (int i = 0; i < 10 && steps; i++) {
            double r = tap_compare(out.step_latents + (size_t)i * per, steps + (size_t)i * per, per).rel;
            worst = r > worst ? r : worst;
        }
        tap_ok(steps && worst <= 1e-4, "%s: %s: every step's latents, worst rel L2 %.3g", tap_device(), model, worst);
        snprintf(what, sizeof what, "%s: final latents", model);
        compare(what, out.latents, ref(ix, "final_latents", per), per, 1e-4);
        snprintf(what, sizeof what, "%s: decoded image", model);
        compare(what, out.images, ref(ix, "decoded", 3 * 128 * 128), 3 * 128 * 128, 1e-4);
        /* without the trace the DDIM steps run on the device
         * (db_ddim_step_forward): the traced run's latents, byte for byte */
        db_txt2img_out dv;
        const int drc = db_txt2img(&sd, &o, 0, 0, &dv, &e);
        tap_ok(!drc && !memcmp(dv.latents, out.latents, per * sizeof(float)),
               "%s: %s: DDIM stepped on the device: the host-stepped final latents, byte for byte %s", tap_device(),
               model, e.msg);
        if (!drc)
            db_txt2img_out_free(&dv);
        db_txt2img_out_free(&out);
    }
    db_sd_close(&sd);
}

int main(void)
{
    db_tindex ix;
    db_tindex_init(&ix);
    db_safetensors *st;
    db_err e = {0};
    /* db_sd_open_device makes the pipeline's own ctx; this one, made and
     * dropped before any TAP line, only decides whether the device exists
     * (a missing optional one skips the test, a missing required one fails) */
    db_ctx *probe = NULL;
    if (tap_ctx_create(&probe, &e)) {
        tap_ok(0, "%s context: %s", tap_device(), e.msg);
        return tap_done();
    }
    db_ctx_destroy(probe);
    if (!tap_ok(!db_safetensors_open(&st, tap_path("tests/data/refs/pipeline.safetensors"), NULL, 0, &ix, &e),
                "reference: %s", e.msg))
        return tap_done();
    run("tests/data/tiny/diffusers", &ix);
    run("tests/data/tiny/tiny.ckpt", &ix);

    /* seeded noise: same seed -> same latents; image i of a batch == -n 1 at index i */
    db_sd sd;
    if (tap_ok(!db_sd_open_device(&sd, tap_path("tests/data/tiny/diffusers"), NULL, tap_device(), 0, &e),
               "open on %s: %s", tap_device(), e.msg)) {
        db_txt2img_opts o = {.prompt = "a (photo:1.2) of [sks] dog", .scheduler = "euler_a", .steps = 3,
                             .guidance = 5, .width = 64, .height = 64, .n_images = 2, .batch = 2, .seed = 7};
        db_txt2img_out a, b;
        int ok = !db_txt2img(&sd, &o, 0, 0, &a, &e);
        o.n_images = 1;
        o.batch = 1;
        o.first_index = 1;
        ok = ok && !db_txt2img(&sd, &o, 0, 0, &b, &e);
        size_t per = 4 * 8 * 8;
        /* same noise; batching only changes the GEMMs' rounding order */
        double r = ok ? tap_compare(a.latents + per, b.latents, per).rel : INFINITY;
        tap_ok(r < 1e-5,
               "%s: image 1 of a batch of 2 equals image index 1 sampled alone (euler_a, emphasis): rel %.3g %s",
               tap_device(), r, e.msg);
        if (ok) {
            db_txt2img_out_free(&a);
            db_txt2img_out_free(&b);
        }
        /* the steps replayed as a graph (the default) against run directly:
         * 3 images in batches of 2, so the short last batch needs a graph of
         * its own (a stale one replays the old batch size) */
        db_txt2img_opts og = {.prompt = "a photo of sks dog", .scheduler = "dpmpp_2m", .steps = 4, .guidance = 5,
                              .width = 64, .height = 64, .n_images = 3, .batch = 2, .seed = 11};
        db_txt2img_out ga, gb;
        int gok = !db_txt2img(&sd, &og, 0, 1, &ga, &e);
        og.no_graph = 1;
        gok = gok && !db_txt2img(&sd, &og, 0, 1, &gb, &e);
        tap_ok(gok && !memcmp(ga.latents, gb.latents, 3 * per * sizeof(float)) &&
                   !memcmp(ga.step_latents, gb.step_latents, 4 * 3 * per * sizeof(float)),
               "%s: graph replay == direct steps, every step's latents byte-identical (3 images, batch 2) %s",
               tap_device(), e.msg);
        if (gok) {
            db_txt2img_out_free(&ga);
            db_txt2img_out_free(&gb);
        }
        /* DDIM without noise steps on the device unless host_step: the same
         * latents byte for byte, 3 images in batches of 2 with guidance
         * (the short last batch), graphs on and off; with eta > 0 (noise)
         * the host steps, and it differs from eta 0 */
        {
            db_txt2img_opts od = {.prompt = "a photo of sks dog", .scheduler = "ddim", .steps = 4, .guidance = 5,
                                  .width = 64, .height = 64, .n_images = 3, .batch = 2, .seed = 5};
            db_txt2img_out da, dh, dg, de;
            int dok = !db_txt2img(&sd, &od, 0, 0, &da, &e);
            od.host_step = 1;
            dok = dok && !db_txt2img(&sd, &od, 0, 0, &dh, &e);
            od.host_step = 0, od.no_graph = 1;
            dok = dok && !db_txt2img(&sd, &od, 0, 0, &dg, &e);
            od.no_graph = 0, od.eta = 0.5;
            dok = dok && !db_txt2img(&sd, &od, 0, 0, &de, &e);
            const size_t bytes = 3 * per * sizeof(float);
            tap_ok(dok && !memcmp(da.latents, dh.latents, bytes) && !memcmp(dg.latents, dh.latents, bytes) &&
                       memcmp(de.latents, dh.latents, bytes),
                   "%s: DDIM stepped on the device == on the host, byte for byte (3 images, batch 2, graphs on "
                   "and off; eta 0.5 differs) %s", tap_device(), e.msg);
            if (dok) {
                db_txt2img_out_free(&da), db_txt2img_out_free(&dh);
                db_txt2img_out_free(&dg), db_txt2img_out_free(&de);
            }
        }
        /* keep_models: the denoising step (its buffers and graph) is kept
         * between calls of one shape, so a later call replays the graph
         * from its first step, with its own prompt and seed: each call's
         * latents are those of the same call on a fresh pipeline */
        {
            db_txt2img_opts ok1 = {.prompt = "a photo of sks dog", .scheduler = "ddim", .steps = 3, .guidance = 5,
                                   .width = 64, .height = 64, .n_images = 1, .batch = 1, .seed = 3};
            db_txt2img_opts ok2 = ok1;
            ok2.prompt = "a watercolour of a cat", ok2.seed = 4;
            db_txt2img_out r1, r2, k1, k2, k3;
            int kok = !db_txt2img(&sd, &ok1, 0, 1, &r1, &e) && !db_txt2img(&sd, &ok2, 0, 1, &r2, &e);
            const int had = sd.step != NULL; /* keep_models 0: nothing kept */
            sd.keep_models = 1;
            kok = kok && !db_txt2img(&sd, &ok1, 0, 1, &k1, &e);
            const int kept = sd.step != NULL;
            kok = kok && !db_txt2img(&sd, &ok2, 0, 1, &k2, &e) && !db_txt2img(&sd, &ok1, 0, 1, &k3, &e);
            const size_t bytes = 3 * per * sizeof(float);
            tap_ok(kok && !had && kept && !memcmp(k1.step_latents, r1.step_latents, bytes) &&
                       !memcmp(k2.step_latents, r2.step_latents, bytes) &&
                       !memcmp(k3.step_latents, r1.step_latents, bytes),
                   "%s: keep_models keeps the denoising step (%d), and three calls through it (two prompts and "
                   "seeds) give every step's latents of fresh calls byte for byte %s", tap_device(), kept, e.msg);
            /* another shape makes a step of its own, and back again */
            ok1.n_images = ok1.batch = 2;
            db_txt2img_out k4, k5;
            int sok = !db_txt2img(&sd, &ok1, 0, 0, &k4, &e) && sd.step;
            ok1.n_images = ok1.batch = 1;
            sok = sok && !db_txt2img(&sd, &ok1, 0, 1, &k5, &e);
            tap_ok(sok && kok && !memcmp(k5.step_latents, r1.step_latents, bytes),
                   "%s: after a call of another batch size, the first shape's call is a fresh one's again %s",
                   tap_device(), e.msg);
            db_sd_drop_step(&sd);
            tap_ok(!sd.step, "db_sd_drop_step frees it");
            sd.keep_models = 0;
            if (kok) {
                db_txt2img_out_free(&r1), db_txt2img_out_free(&r2);
                db_txt2img_out_free(&k1), db_txt2img_out_free(&k2), db_txt2img_out_free(&k3);
            }
            if (sok)
                db_txt2img_out_free(&k4), db_txt2img_out_free(&k5);
        }
        o.width = 60;
        tap_ok(db_txt2img(&sd, &o, 0, 0, &a, &e) && strstr(e.msg, "multiples of 8"), "bad size refused: %s", e.msg);
        o.width = 64;
        o.scheduler = "heun";
        tap_ok(db_txt2img(&sd, &o, 0, 0, &a, &e) && strstr(e.msg, "heun"), "unknown scheduler refused: %s", e.msg);
        db_sd_close(&sd);
    }
    db_safetensors_close(st);
    db_tindex_free(&ix);
    return tap_done();
}
