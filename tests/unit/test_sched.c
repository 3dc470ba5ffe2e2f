/* Schedulers against diffusers 0.27.2 (tests/data/sched: the tiny-dev
 * scheduler references): every timestep and sigma exact, every step's
 * scaled input, sample and predicted x0 within the reference tolerance,
 * DDPM tables and add_noise; then spacings, parameterisations and refusals
 * that the reference does not cover. */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/io/safetensors.h"
#include "kernels/ops.h"
#include "libcommon/sd/sched.h"
#include "tap.h"

static db_tindex ix;

/* Reference tensor `name` (C-contiguous); NULL when absent or another dtype. */
static const void *ref(const char *name, db_dtype dt, int64_t *numel)
{
    long k = db_tindex_find(&ix, name);
    if (k < 0 || ix.v[k].dtype != dt)
        return NULL;
    if (numel)
        *numel = db_shape_numel(ix.v[k].ndim, ix.v[k].shape);
    return ix.v[k].ptr;
}

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Running comparison of one tensor kind over a trajectory. */
typedef struct cmp {
    double rel;    /* worst per-step relative L2 error */
    double maxabs; /* worst element error */
    size_t exact, total;
} cmp;

static void cmp_add(cmp *c, const float *got, const float *want, size_t n)
{
    double num = 0, den = 0;
    for (size_t k = 0; k < n; k++) {
        double d = (double)got[k] - want[k];
        num += d * d;
        den += (double)want[k] * want[k];
        c->maxabs = fmax(c->maxabs, fabs(d));
        if (!(fabs(d) <= INFINITY))
            c->maxabs = INFINITY; /* NaN */
        c->exact += fbits(got[k]) == fbits(want[k]);
    }
    double rel = den > 0 ? sqrt(num / den) : sqrt(num);
    if (!(rel <= c->rel))
        c->rel = rel;
    c->total += n;
}

/* The tolerance rule: max(1e-6 relative L2, the manifest's suggested atol). */
static int cmp_ok(const cmp *c, double atol)
{
    return c->total > 0 && (c->rel <= 1e-6 || c->maxabs <= atol);
}

static double atol_of(const json_t *man, const char *key)
{
    const json_t *e = json_object_get(json_object_get(man, "schedulers"), key);
    const json_t *a = json_object_get(e, "suggested_atol");
    return json_is_number(a) ? json_number_value(a) : 1e-6;
}

/* Worst relative L2 per scheduler name, for the summary. */
static struct {
    const char *name;
    double rel;
    double maxabs;
} summary[8];

static void note_worst(const char *name, const cmp *c)
{
    for (int i = 0; i < 8; i++) {
        if (!summary[i].name)
            summary[i].name = name;
        if (!strcmp(summary[i].name, name)) {
            summary[i].rel = fmax(summary[i].rel, c->rel);
            summary[i].maxabs = fmax(summary[i].maxabs, c->maxabs);
            return;
        }
    }
}

static const char *our_name(const char *cls, const json_t *config)
{
    if (!strcmp(cls, "DDIMScheduler"))
        return "ddim";
    if (!strcmp(cls, "PNDMScheduler"))
        return "pndm";
    if (!strcmp(cls, "EulerDiscreteScheduler"))
        return "euler";
    if (!strcmp(cls, "EulerAncestralDiscreteScheduler"))
        return "euler_a";
    if (!strcmp(cls, "DPMSolverMultistepScheduler"))
        return json_is_true(json_object_get(config, "use_karras_sigmas")) ? "dpmpp_2m_karras" : "dpmpp_2m";
    if (!strcmp(cls, "DDPMScheduler"))
        return "ddpm";
    return NULL;
}

/* One reference case "name/steps": schedule, then the scripted trajectory. */
static void run_case(const char *key, const json_t *c, const json_t *man)
{
    db_err e = {0};
    const json_t *config = json_object_get(c, "config");
    const char *name = our_name(json_string_value(json_object_get(c, "class")), config);
    int steps = (int)json_integer_value(json_object_get(c, "num_inference_steps"));
    db_sched *s = NULL;
    if (!tap_ok(name && !db_sched_create(&s, name, config, &e), "%s: create %s: %s", key, name ? name : "?", e.msg))
        return;
    const json_t *eta = json_object_get(json_object_get(c, "step_kwargs"), "eta");
    if (eta)
        db_sched_set_eta(s, json_number_value(eta), &e);
    if (!tap_ok(!db_sched_set_timesteps(s, steps, &e), "%s: set_timesteps(%d): %s", key, steps, e.msg)) {
        db_sched_free(s);
        return;
    }

    char rn[128];
    int64_t nt = 0;
    snprintf(rn, sizeof rn, "%s/timesteps", key);
    const int64_t *rts = ref(rn, DB_I64, &nt);
    int nsteps = db_sched_nsteps(s), bad = 0;
    for (int i = 0; rts && i < nsteps && i < nt; i++)
        /* the reference stores Euler's float32 timesteps as int64 (truncated) */
        bad += (int64_t)db_sched_timestep(s, i) != rts[i];
    tap_ok(rts && nt == nsteps && !bad, "%s: %d timesteps exact (%d differ)", key, nsteps, bad);

    snprintf(rn, sizeof rn, "%s/sigmas", key);
    int64_t ns = 0;
    const float *rsig = ref(rn, DB_F32, &ns);
    if (rsig) {
        const float *sig = db_sched_sigmas(s);
        bad = !sig || ns != nsteps + 1;
        for (int64_t i = 0; !bad && i < ns; i++)
            bad += fbits(sig[i]) != fbits(rsig[i]);
        tap_ok(!bad, "%s: %lld sigmas bit-exact", key, (long long)ns);
    }
    float want_sigma = (float)json_number_value(json_object_get(c, "init_noise_sigma"));
    tap_ok(db_sched_init_noise_sigma(s) == want_sigma, "%s: init_noise_sigma %.9g (want %.9g)", key,
           (double)db_sched_init_noise_sigma(s), (double)want_sigma);

    /* the trajectory: x[0] = x_init * init_noise_sigma, then scripted eps/noise */
    int64_t nx = 0, ne = 0, nn = 0;
    const float *xinit = ref("x_init", DB_F32, &nx);
    const float *eps = ref("eps", DB_F32, &ne), *noise = ref("noise", DB_F32, &nn);
    snprintf(rn, sizeof rn, "%s/x", key);
    const float *rx = ref(rn, DB_F32, NULL);
    snprintf(rn, sizeof rn, "%s/scaled_input", key);
    const float *rsc = ref(rn, DB_F32, NULL);
    snprintf(rn, sizeof rn, "%s/pred_original_sample", key);
    const float *rpx = ref(rn, DB_F32, NULL);
    const size_t n = (size_t)nx;
    if (!tap_ok(xinit && eps && noise && rx && rsc && (int64_t)n * nsteps <= ne, "%s: reference tensors present", key)) {
        db_sched_free(s);
        return;
    }
    float *x = malloc(n * sizeof *x), *in = malloc(n * sizeof *in), *px = malloc(n * sizeof *px);
    float sigma0 = db_sched_init_noise_sigma(s);
    for (size_t k = 0; k < n; k++)
        x[k] = xinit[k] * sigma0;
    cmp cx = {0}, cs = {0}, cp = {0};
    cmp_add(&cx, x, rx, n);
    int ok = 1;
    for (int i = 0; i < nsteps && ok; i++) {
        db_sched_scale_model_input(s, i, in, x, n);
        cmp_add(&cs, in, rsc + (size_t)i * n, n);
        const float *nz = db_sched_needs_noise(s, i) ? noise + (size_t)i * n : NULL;
        ok = !db_sched_step(s, i, eps + (size_t)i * n, x, n, nz, px, &e);
        cmp_add(&cx, x, rx + (size_t)(i + 1) * n, n);
        if (rpx)
            cmp_add(&cp, px, rpx + (size_t)i * n, n);
    }
    tap_ok(ok, "%s: %d steps run: %s", key, nsteps, ok ? "" : e.msg);

    snprintf(rn, sizeof rn, "%s/x", key);
    double ax = atol_of(man, rn);
    tap_ok(cmp_ok(&cx, ax), "%s: x: rel L2 %.3g, max |err| %.3g (atol %.1g), %zu/%zu bit-exact", key, cx.rel,
           cx.maxabs, ax, cx.exact, cx.total);
    snprintf(rn, sizeof rn, "%s/scaled_input", key);
    double as = atol_of(man, rn);
    tap_ok(cmp_ok(&cs, as), "%s: scaled_input: rel L2 %.3g, max |err| %.3g (atol %.1g), %zu/%zu bit-exact", key,
           cs.rel, cs.maxabs, as, cs.exact, cs.total);
    note_worst(name, &cx);
    note_worst(name, &cs);
    if (rpx) {
        snprintf(rn, sizeof rn, "%s/pred_original_sample", key);
        double ap = atol_of(man, rn);
        tap_ok(cmp_ok(&cp, ap), "%s: pred_original_sample: rel L2 %.3g, max |err| %.3g (atol %.1g), %zu/%zu bit-exact",
               key, cp.rel, cp.maxabs, ap, cp.exact, cp.total);
        note_worst(name, &cp);
    }
    free(x);
    free(in);
    free(px);
    db_sched_free(s);
}

/* DDPM: the tables bit for bit, add_noise against the reference, velocity
 * and the ancestral step against double-precision formulas. */
static void run_ddpm(const json_t *c, const json_t *man)
{
    db_err e = {0};
    db_sched *s = NULL;
    if (!tap_ok(!db_sched_create(&s, "ddpm", json_object_get(c, "config"), &e), "ddpm: create: %s", e.msg))
        return;
    int64_t nb = 0, na = 0;
    const float *rb = ref("ddpm/betas", DB_F32, &nb), *ra = ref("ddpm/alphas_cumprod", DB_F32, &na);
    int N = db_sched_num_train_timesteps(s), bb = 0, ba = 0;
    for (int i = 0; rb && ra && i < N && i < nb; i++) {
        bb += fbits(db_sched_betas(s)[i]) != fbits(rb[i]);
        ba += fbits(db_sched_alphas_cumprod(s)[i]) != fbits(ra[i]);
    }
    tap_ok(rb && nb == N && !bb, "ddpm: %d betas bit-exact (%d differ)", N, bb);
    tap_ok(ra && na == N && !ba, "ddpm: %d alphas_cumprod bit-exact (%d differ)", N, ba);

    int64_t nx = 0, nt = 0;
    const float *x0 = ref("ddpm/x0", DB_F32, &nx), *nz = ref("ddpm/noise", DB_F32, NULL);
    const float *noisy = ref("ddpm/noisy", DB_F32, NULL);
    const int64_t *ts = ref("ddpm/timesteps", DB_I64, &nt);
    if (tap_ok(x0 && nz && noisy && ts && nt > 0, "ddpm: add_noise references present")) {
        size_t per = (size_t)(nx / nt);
        float *out = malloc(per * sizeof *out);
        cmp cn = {0};
        double vworst = 0;
        int ok = 1;
        for (int64_t b = 0; b < nt; b++) {
            ok &= !db_sched_add_noise(s, out, x0 + b * per, nz + b * per, per, ts[b], &e);
            cmp_add(&cn, out, noisy + b * per, per);
            /* velocity = sqrt(acp) noise - sqrt(1 - acp) x0 */
            ok &= !db_sched_velocity(s, out, x0 + b * per, nz + b * per, per, ts[b], &e);
            double a = db_sched_alphas_cumprod(s)[ts[b]];
            for (size_t k = 0; k < per; k++) {
                double v = sqrt(a) * nz[b * per + k] - sqrt(1 - a) * x0[b * per + k];
                vworst = fmax(vworst, fabs(out[k] - v) / fmax(fabs(v), 1.0));
            }
        }
        double at = atol_of(man, "ddpm/noisy");
        tap_ok(ok && cmp_ok(&cn, at), "ddpm: add_noise at t = 0, 17, 500, 999: rel L2 %.3g, max |err| %.3g (atol %.1g), %zu/%zu bit-exact",
               cn.rel, cn.maxabs, at, cn.exact, cn.total);
        tap_ok(ok && vworst < 1e-6, "ddpm: velocity vs double formula: worst %.3g", vworst);
        note_worst("ddpm", &cn);
        free(out);
    }
    tap_ok(db_sched_add_noise(s, NULL, NULL, NULL, 0, 1000, &e) < 0 && strstr(e.msg, "1000"),
           "ddpm: add_noise refuses t = 1000: %s", e.msg);

    /* the ancestral step (no diffusers reference): the DDPM posterior mean
     * and fixed_small std, in double from the float tables */
    if (!db_sched_set_timesteps(s, 10, &e)) {
        enum { M = 64 };
        float x[M], mo[M], z[M], px[M];
        double worst = 0;
        const float *acp = db_sched_alphas_cumprod(s);
        for (int k = 0; k < M; k++) {
            x[k] = (float)sin(k * 0.37) * 3;
            mo[k] = (float)cos(k * 0.11);
            z[k] = (float)sin(k * 1.7 + 0.2);
        }
        for (int i = 0; i < db_sched_nsteps(s); i++) {
            int64_t t = (int64_t)db_sched_timestep(s, i), p = t - N / 10;
            double a = acp[t], ap = p >= 0 ? acp[p] : 1.0, b = 1 - a, bp = 1 - ap, ca = a / ap, cb = 1 - ca;
            double want[M];
            for (int k = 0; k < M; k++) {
                double x0v = (x[k] - sqrt(b) * mo[k]) / sqrt(a); /* clip_sample is false */
                double mean = sqrt(ap) * cb / b * x0v + sqrt(ca) * bp / b * x[k];
                double var = fmax(bp / b * cb, 1e-20);
                want[k] = mean + (t > 0 ? sqrt(var) * z[k] : 0);
            }
            if (db_sched_step(s, i, mo, x, M, z, px, &e)) {
                worst = INFINITY;
                break;
            }
            for (int k = 0; k < M; k++)
                worst = fmax(worst, fabs(x[k] - want[k]) / fmax(fabs(want[k]), 1e-3));
        }
        tap_ok(worst < 2e-6, "ddpm: 10 ancestral steps vs double formula: worst relative %.3g", worst);
        int all = 1;
        for (int i = 0; i < db_sched_nsteps(s); i++)
            all &= db_sched_needs_noise(s, i) == (db_sched_timestep(s, i) > 0);
        tap_ok(all, "ddpm: exactly the steps with t > 0 draw noise");
        tap_ok(db_sched_step(s, 0, mo, x, M, NULL, NULL, &e) < 0 && strstr(e.msg, "noise"),
               "ddpm: a step without its noise is refused: %s", e.msg);
    }
    db_sched_free(s);
}

/* Timesteps of hand-derived cases (numpy semantics: round half to even,
 * arange's length and fill rule). */
static int ts_equal(const char *name, const char *cfg_text, int steps, const double *want, int nwant)
{
    db_err e = {0};
    json_t *cfg = NULL;
    db_sched *s = NULL;
    int ok = !db_sched_config_parse(cfg_text, strlen(cfg_text), &cfg, &e) && !db_sched_create(&s, name, cfg, &e) &&
             !db_sched_set_timesteps(s, steps, &e) && db_sched_nsteps(s) == nwant;
    for (int i = 0; ok && i < nwant; i++)
        ok = db_sched_timestep(s, i) == want[i];
    if (!ok && s) {
        char buf[512] = "";
        for (int i = 0; i < db_sched_nsteps(s) && strlen(buf) < 400; i++)
            snprintf(buf + strlen(buf), sizeof buf - strlen(buf), " %g", db_sched_timestep(s, i));
        tap_diag("%s %d steps: got%s %s", name, steps, buf, e.msg);
    }
    db_sched_free(s);
    json_decref(cfg);
    return ok;
}

static void spacings(void)
{
    static const char sd[] = "{\"beta_schedule\": \"scaled_linear\", \"beta_start\": 0.00085, \"beta_end\": 0.012,"
                             " \"steps_offset\": 1, \"set_alpha_to_one\": false, \"clip_sample\": false,"
                             " \"skip_prk_steps\": true, \"timestep_spacing\": \"%s\"}";
    char cfg[512];
    snprintf(cfg, sizeof cfg, sd, "linspace");
    /* linspace(0, 999, 7) = 0, 166.5, 333, 499.5, 666, 832.5, 999: halves go to even */
    static const double lin7[] = {999, 832, 666, 500, 333, 166, 0};
    tap_ok(ts_equal("ddim", cfg, 7, lin7, 7), "ddim linspace 7: round half to even");
    /* DPM: linspace(0, 999, 8).round()[::-1][:-1] */
    static const double dlin7[] = {999, 856, 714, 571, 428, 285, 143};
    tap_ok(ts_equal("dpmpp_2m", cfg, 7, dlin7, 7), "dpmpp_2m linspace 7");
    /* linspace(0, 999, 7) again, through DPM's steps + 1 rule: 832.5 -> 832, 166.5 -> 166 */
    static const double dlin6[] = {999, 832, 666, 500, 333, 166};
    tap_ok(ts_equal("dpmpp_2m", cfg, 6, dlin6, 6), "dpmpp_2m linspace 6: round half to even");
    snprintf(cfg, sizeof cfg, sd, "trailing");
    static const double tr3[] = {999, 666, 332}, tr6[] = {999, 832, 666, 499, 332, 166};
    static const double tr10[] = {999, 899, 799, 699, 599, 499, 399, 299, 199, 99};
    tap_ok(ts_equal("ddim", cfg, 3, tr3, 3) && ts_equal("ddim", cfg, 6, tr6, 6) && ts_equal("ddim", cfg, 10, tr10, 10),
           "ddim trailing 3, 6, 10");
    static const double etr4[] = {999, 749, 499, 249};
    tap_ok(ts_equal("euler", cfg, 4, etr4, 4), "euler trailing 4");
    snprintf(cfg, sizeof cfg, sd, "leading");
    /* DPM leading: (arange(11) * (1000 // 11))[::-1][:-1] + 1 */
    static const double dle[] = {901, 811, 721, 631, 541, 451, 361, 271, 181, 91};
    tap_ok(ts_equal("dpmpp_2m", cfg, 10, dle, 10), "dpmpp_2m leading 10");
    static const double ple[] = {901, 801, 801, 701, 601, 501, 401, 301, 201, 101, 1};
    tap_ok(ts_equal("pndm", cfg, 10, ple, 11), "pndm leading 10 (PLMS repeats the second timestep)");
    static const double ele[] = {901, 801, 701, 601, 501, 401, 301, 201, 101, 1};
    tap_ok(ts_equal("euler", cfg, 10, ele, 10), "euler leading 10");
    {
        db_err e = {0};
        json_t *j = NULL;
        db_sched *s = NULL;
        int ok = !db_sched_config_parse(cfg, strlen(cfg), &j, &e) && !db_sched_create(&s, "euler", j, &e) &&
                 !db_sched_set_timesteps(s, 10, &e);
        float mx = ok ? db_sched_sigmas(s)[0] : 0;
        tap_ok(ok && db_sched_init_noise_sigma(s) == sqrtf(mx * mx + 1.0f),
               "euler leading: init_noise_sigma = sqrt(sigma_max^2 + 1)");
        db_sched_free(s);
        json_decref(j);
    }
    static const double ddle[] = {901, 801, 701, 601, 501, 401, 301, 201, 101, 1};
    tap_ok(ts_equal("ddpm", cfg, 10, ddle, 10) && ts_equal("ddim", cfg, 10, ddle, 10), "ddpm/ddim leading 10");
}

/* v and sample prediction must give what epsilon prediction gives for the
 * same underlying (x0, eps): one first step of each scheduler. */
static void parameterisations(void)
{
    static const char *const names[] = {"ddim", "ddpm", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras"};
    enum { M = 256 };
    static float x0[M], ep[M], z[M];
    for (int k = 0; k < M; k++) {
        x0[k] = (float)(0.8 * sin(k * 0.71));
        ep[k] = (float)cos(k * 1.3 + 0.4);
        z[k] = (float)sin(k * 2.9);
    }
    for (size_t q = 0; q < sizeof names / sizeof names[0]; q++) {
        double worst_v = 0, worst_s = 0;
        int ok = 1, with_sample = strcmp(names[q], "pndm") && strcmp(names[q], "euler_a");
        float out[3][M];
        for (int pt = 0; pt < 3 && ok; pt++) {
            if (pt == 2 && !with_sample)
                break;
            static const char *const pn[] = {"epsilon", "v_prediction", "sample"};
            char cfg[512];
            snprintf(cfg, sizeof cfg,
                     "{\"beta_schedule\": \"scaled_linear\", \"beta_start\": 0.00085, \"beta_end\": 0.012,"
                     " \"clip_sample\": false, \"skip_prk_steps\": true, \"prediction_type\": \"%s\"}",
                     pn[pt]);
            db_err e = {0};
            json_t *j = NULL;
            db_sched *s = NULL;
            ok = !db_sched_config_parse(cfg, strlen(cfg), &j, &e) && !db_sched_create(&s, names[q], j, &e) &&
                 !db_sched_set_timesteps(s, 20, &e);
            if (!ok) {
                tap_diag("%s %s: %s", names[q], pn[pt], e.msg);
                db_sched_free(s);
                json_decref(j);
                break;
            }
            /* the sample at call 0 in the scheduler's own space, and the
             * model's target: eps, v = sqrt(a) eps - sqrt(1 - a) x0, or x0 */
            const float *sig = db_sched_sigmas(s);
            const int euler = sig && strncmp(names[q], "dpm", 3);
            /* alpha-bar of call 0: from sigma = sqrt((1 - a) / a) where there are sigmas */
            double a = sig ? 1.0 / (1.0 + (double)sig[0] * sig[0])
                           : db_sched_alphas_cumprod(s)[(int)db_sched_timestep(s, 0)];
            float x[M], mo[M];
            for (int k = 0; k < M; k++) {
                if (euler) /* Euler's sample: x0 + sigma eps; the others: sqrt(a) x0 + sqrt(1 - a) eps */
                    x[k] = (float)(x0[k] + (double)sig[0] * ep[k]);
                else
                    x[k] = (float)(sqrt(a) * x0[k] + sqrt(1 - a) * ep[k]);
                mo[k] = pt == 0 ? ep[k] : pt == 1 ? (float)(sqrt(a) * ep[k] - sqrt(1 - a) * x0[k]) : x0[k];
            }
            ok = !db_sched_step(s, 0, mo, x, M, z, NULL, &e);
            memcpy(out[pt], x, sizeof x);
            db_sched_free(s);
            json_decref(j);
        }
        for (int k = 0; ok && k < M; k++) {
            double d = fmax(fabs(out[0][k]), 1.0);
            worst_v = fmax(worst_v, fabs(out[1][k] - out[0][k]) / d);
            if (with_sample)
                worst_s = fmax(worst_s, fabs(out[2][k] - out[0][k]) / d);
        }
        tap_ok(ok && worst_v < 1e-5 && worst_s < 1e-5, "%s: v_prediction%s agree with epsilon (%.2g, %.2g)", names[q],
               with_sample ? " and sample" : "", worst_v, worst_s);
    }
}

static int refused(const char *name, const char *cfg_text, const char *needle)
{
    db_err e = {0};
    json_t *j = NULL;
    db_sched *s = NULL;
    if (cfg_text && db_sched_config_parse(cfg_text, strlen(cfg_text), &j, &e) < 0) {
        tap_diag("bad test config: %s", e.msg);
        return 0;
    }
    int rc = db_sched_create(&s, name, j, &e);
    json_decref(j);
    db_sched_free(s);
    int ok = rc < 0 && s == NULL && strstr(e.msg, needle);
    if (rc < 0)
        tap_diag("%s", e.msg);
    return ok;
}

static void refusals(void)
{
    tap_ok(refused("heun", NULL, "heun") && refused("heun", NULL, "dpmpp_2m_karras"),
           "unknown scheduler name refused, naming it and the choices");
    tap_ok(refused("ddim", "{\"beta_schedule\": \"cubic\"}", "beta_schedule"), "unknown beta_schedule refused");
    tap_ok(refused("euler", "{\"timestep_spacing\": \"even\"}", "timestep_spacing"), "unknown timestep_spacing refused");
    tap_ok(refused("dpmpp_2m", "{\"prediction_type\": \"flow\"}", "prediction_type"), "unknown prediction_type refused");
    tap_ok(refused("ddim", "{\"num_train_timesteps\": -5}", "num_train_timesteps") &&
               refused("ddim", "{\"num_train_timesteps\": \"1000\"}", "num_train_timesteps"),
           "bad num_train_timesteps refused");
    tap_ok(refused("ddim", "{\"beta_start\": \"small\"}", "beta_start"), "non-numeric beta_start refused");
    tap_ok(refused("ddim", "{\"thresholding\": true}", "thresholding"), "thresholding refused as unsupported");
    tap_ok(refused("pndm", "{\"skip_prk_steps\": false}", "skip_prk_steps"), "PNDM PRK steps refused");
    tap_ok(refused("ddpm", "{\"variance_type\": \"learned_range\"}", "variance_type"), "learned variance refused");
    tap_ok(refused("euler", "{\"interpolation_type\": \"log_linear\"}", "interpolation_type"),
           "euler log_linear refused");
    tap_ok(refused("ddim", "{\"trained_betas\": [0.1, 0.2]}", "trained_betas"), "trained_betas of the wrong length refused");
    tap_ok(refused("ddim", "{\"beta_start\": 0.5, \"beta_end\": 3.0}", "beta_end") &&
               refused("euler", "{\"num_train_timesteps\": 3, \"trained_betas\": [0.5, 0.5, 1.0]}", "no signal"),
           "betas above 1, or a zero alpha product where sigmas are needed, refused");
    tap_ok(refused("ddim", "[1, 2]", "object"), "a config that is not an object refused");

    db_err e = {0};
    db_sched *s = NULL;
    if (!db_sched_create(&s, "ddim", NULL, &e)) {
        tap_ok(db_sched_set_timesteps(s, 0, &e) < 0 && db_sched_set_timesteps(s, 1001, &e) < 0 &&
                   strstr(e.msg, "1001"),
               "0 and 1001 steps refused: %s", e.msg);
        float x[4] = {0}, m[4] = {0};
        tap_ok(db_sched_step(s, 0, m, x, 4, NULL, NULL, &e) < 0, "step before set_timesteps refused");
        db_sched_free(s);
    }
    json_t *j = NULL;
    const char *off = "{\"steps_offset\": 5, \"timestep_spacing\": \"leading\"}";
    if (!db_sched_config_parse(off, strlen(off), &j, &e) && !db_sched_create(&s, "ddim", j, &e)) {
        /* leading 1 step: timestep 0 + 5 fine; 1000 steps: 999 + 5 outside */
        tap_ok(!db_sched_set_timesteps(s, 1, &e) && db_sched_set_timesteps(s, 1000, &e) < 0 &&
                   strstr(e.msg, "steps_offset"),
               "timesteps beyond the table refused: %s", e.msg);
        db_sched_free(s);
    }
    json_decref(j);
    if (!db_sched_create(&s, "dpmpp_2m", NULL, &e) && !db_sched_set_timesteps(s, 5, &e)) {
        float x[4] = {0}, m[4] = {0};
        int ok = !db_sched_step(s, 0, m, x, 4, NULL, NULL, &e);
        tap_ok(ok && db_sched_step(s, 2, m, x, 4, NULL, NULL, &e) < 0 && strstr(e.msg, "order"),
               "dpmpp_2m: steps out of order refused: %s", e.msg);
        tap_ok(db_sched_step(s, 1, m, x, 3, NULL, NULL, &e) < 0, "dpmpp_2m: a changed element count refused");
        db_sched_free(s);
    }
    if (!db_sched_create(&s, "euler_a", NULL, &e) && !db_sched_set_timesteps(s, 5, &e)) {
        float x[4] = {0}, m[4] = {0};
        tap_ok(db_sched_step(s, 0, m, x, 4, NULL, NULL, &e) < 0 && strstr(e.msg, "noise"),
               "euler_a: a step without noise refused");
        db_sched_free(s);
    }
}

/* Other tables: zero terminal SNR, the cosine schedule, trained betas. */
static void tables(void)
{
    db_err e = {0};
    json_t *j = NULL;
    db_sched *s = NULL, *t = NULL;
    const char *z = "{\"beta_schedule\": \"scaled_linear\", \"beta_start\": 0.00085, \"beta_end\": 0.012,"
                    " \"rescale_betas_zero_snr\": true, \"timestep_spacing\": \"trailing\","
                    " \"prediction_type\": \"v_prediction\"}";
    if (!db_sched_config_parse(z, strlen(z), &j, &e) && !db_sched_create(&s, "ddim", j, &e) &&
        !db_sched_create(&t, "euler", j, &e)) {
        const float *a = db_sched_alphas_cumprod(s), *b = db_sched_alphas_cumprod(t);
        tap_ok(a[999] == 0.0f && b[999] == 0x1p-24f && a[0] == b[0] && a[0] > 0.99f,
               "zero terminal SNR: ddim alphas_cumprod[-1] 0, euler 2^-24");
        tap_ok(!db_sched_set_timesteps(t, 10, &e) && isfinite(db_sched_init_noise_sigma(t)) &&
                   db_sched_init_noise_sigma(t) > 4000,
               "zero terminal SNR: euler's first sigma is large and finite (%g)", (double)db_sched_init_noise_sigma(t));
    } else {
        tap_ok(0, "zero-SNR config: %s", e.msg);
    }
    db_sched_free(s);
    db_sched_free(t);
    json_decref(j);
    s = NULL;
    const char *cs = "{\"beta_schedule\": \"squaredcos_cap_v2\"}";
    if (!db_sched_config_parse(cs, strlen(cs), &j, &e) && !db_sched_create(&s, "ddpm", j, &e)) {
        const float *b = db_sched_betas(s);
        int mono = 1;
        for (int i = 1; i < 1000; i++)
            mono &= b[i] >= b[i - 1];
        /* first beta: 1 - cos^2((1/1000 + .008)/1.008 pi/2) / cos^2(.008/1.008 pi/2) */
        double c1 = cos((0.001 + 0.008) / 1.008 * M_PI / 2), c0 = cos(0.008 / 1.008 * M_PI / 2);
        tap_ok(mono && b[0] == (float)(1 - c1 * c1 / (c0 * c0)) && b[999] == 0.999f,
               "squaredcos_cap_v2: increasing, first %.6g, capped at 0.999", (double)b[0]);
    }
    db_sched_free(s);
    json_decref(j);
    s = NULL;
    /* trained_betas override the schedule, stored as float32 */
    char buf[16384] = "{\"num_train_timesteps\": 10, \"beta_schedule\": \"nonsense-but-ignored\", \"trained_betas\": [";
    for (int i = 0; i < 10; i++)
        snprintf(buf + strlen(buf), sizeof buf - strlen(buf), "%s0.0%d1", i ? ", " : "", i);
    strcat(buf, "]}");
    int rc = db_sched_config_parse(buf, strlen(buf), &j, &e) == 0 ? db_sched_create(&s, "ddim", j, &e) : -1;
    tap_ok(rc < 0 && strstr(e.msg, "beta_schedule"), "beta_schedule is checked even with trained_betas");
    json_decref(j);
    strcpy(buf, "{\"num_train_timesteps\": 4, \"trained_betas\": [0.1, 0.2, 0.3, 0.4]}");
    s = NULL;
    if (!db_sched_config_parse(buf, strlen(buf), &j, &e) && !db_sched_create(&s, "ddpm", j, &e)) {
        const float *a = db_sched_alphas_cumprod(s);
        static const float tb[4] = {0.1f, 0.2f, 0.3f, 0.4f};
        double acc = 1;
        for (int i = 0; i < 4; i++)
            acc *= (float)(1.0f - tb[i]);
        tap_ok(db_sched_betas(s)[2] == 0.3f && a[3] == (float)acc &&
                   !db_sched_set_timesteps(s, 4, &e) && db_sched_timestep(s, 0) == 3,
               "trained_betas: float32 betas, double-accumulated alphas_cumprod");
    } else {
        tap_ok(0, "trained_betas: %s", e.msg);
    }
    db_sched_free(s);
    json_decref(j);
}

/* db_ddim_step_forward (kernels/ops.h) on the test's device against
 * db_sched_step on the host: the same x and predicted x0, bit for bit, at
 * every step of a schedule, for each prediction type, with clipping and
 * with eta's noise; and db_sched_ddim_coef only for DDIM. */
static void ddim_device(void)
{
    db_err e = {0};
    db_ctx *c = NULL;
    if (!tap_ok(!tap_ctx_create(&c, &e), "%s context: %s", tap_device(), e.msg))
        return;
    static const char base[] = "{\"beta_schedule\": \"scaled_linear\", \"beta_start\": 0.00085, \"beta_end\": 0.012,"
                               " \"steps_offset\": 1, \"set_alpha_to_one\": false, \"prediction_type\": \"%s\","
                               " \"clip_sample\": %s}";
    static const struct {
        const char *pred, *clip;
        double eta;
    } cases[] = {{"epsilon", "false", 0}, {"v_prediction", "false", 0}, {"sample", "false", 0},
                 {"epsilon", "true", 0},  {"epsilon", "false", 0.7}};
    enum { N = 1000, STEPS = 6 };
    float *x = malloc(N * sizeof *x), *mo = malloc(N * sizeof *mo), *nz = malloc(N * sizeof *nz);
    float *hx = malloc(N * sizeof *hx), *hp = malloc(N * sizeof *hp), *dx = malloc(N * sizeof *dx),
          *dp = malloc(N * sizeof *dp);
    float *gx = db_ctx_alloc(c, N * sizeof *gx), *gp = db_ctx_alloc(c, N * sizeof *gp),
          *gm = db_ctx_alloc(c, N * sizeof *gm), *gn = db_ctx_alloc(c, N * sizeof *gn);
    for (int i = 0; i < N; i++) { /* a spread of values, some past the clip range */
        x[i] = 3.0f * sinf(0.37f * (float)i);
        mo[i] = 2.5f * cosf(0.11f * (float)i + 0.5f);
        nz[i] = sinf(1.3f * (float)i) - 0.25f;
    }
    for (size_t ci = 0; ci < sizeof cases / sizeof cases[0]; ci++) {
        char txt[512], what[128];
        snprintf(txt, sizeof txt, base, cases[ci].pred, cases[ci].clip);
        snprintf(what, sizeof what, "%s, clip %s, eta %g", cases[ci].pred, cases[ci].clip, cases[ci].eta);
        json_t *cfg = NULL;
        db_sched *s = NULL;
        int ok = !db_sched_config_parse(txt, strlen(txt), &cfg, &e) && !db_sched_create(&s, "ddim", cfg, &e) &&
                 !db_sched_set_eta(s, cases[ci].eta, &e) && !db_sched_set_timesteps(s, STEPS, &e);
        memcpy(hx, x, N * sizeof *x);
        ok = ok && gx && gp && gm && gn && !db_ctx_copy(c, gx, x, N * sizeof *x, DB_COPY_H2D) &&
             !db_ctx_copy(c, gn, nz, N * sizeof *nz, DB_COPY_H2D);
        int same = ok, noise = 0;
        for (int i = 0; ok && i < db_sched_nsteps(s); i++) {
            db_ddim_coef k;
            ok = !db_sched_ddim_coef(s, i, &k) && !db_sched_step(s, i, mo, hx, N, nz, hp, &e) &&
                 !db_ctx_copy(c, gm, mo, N * sizeof *mo, DB_COPY_H2D) &&
                 !db_ddim_step_forward(c, gx, gp, gm, gn, N, &k) &&
                 !db_ctx_copy(c, dx, gx, N * sizeof *dx, DB_COPY_D2H) &&
                 !db_ctx_copy(c, dp, gp, N * sizeof *dp, DB_COPY_D2H);
            same = same && ok && !memcmp(dx, hx, N * sizeof *dx) && !memcmp(dp, hp, N * sizeof *dp);
            noise |= k.noise_on;
        }
        tap_ok(ok && same && noise == (cases[ci].eta > 0), "%s: ddim_step on %s == db_sched_step, x and x0 bit for "
               "bit over %d steps (%s)%s%s", what, tap_device(), STEPS, noise ? "noise" : "no noise",
               ok ? "" : ": ", ok ? "" : (c->err.code ? c->err.msg : e.msg));
        db_sched_free(s);
        json_decref(cfg);
    }
    /* only DDIM has them */
    db_sched *s = NULL;
    db_ddim_coef k;
    tap_ok(!db_sched_create(&s, "euler", NULL, &e) && !db_sched_set_timesteps(s, 4, &e) &&
               db_sched_ddim_coef(s, 0, &k) < 0,
           "db_sched_ddim_coef refuses another scheduler");
    db_sched_free(s);
    db_ctx_free(c, gx), db_ctx_free(c, gp), db_ctx_free(c, gm), db_ctx_free(c, gn);
    free(x), free(mo), free(nz), free(hx), free(hp), free(dx), free(dp);
    db_ctx_destroy(c);
}

int main(void)
{
    db_err e = {0};
    db_tindex_init(&ix);
    db_safetensors *st = NULL;
    json_t *refs = NULL, *man = NULL;
    if (!tap_ok(!db_safetensors_open(&st, tap_path("tests/data/sched/schedulers.safetensors"), NULL, 0, &ix, &e),
                "open schedulers.safetensors: %s", e.msg) ||
        !tap_ok(!db_sched_config_load(tap_path("tests/data/sched/schedulers.json"), &refs, &e),
                "read schedulers.json (with -Infinity): %s", e.msg) ||
        !tap_ok(!db_sched_config_load(tap_path("tests/data/sched/manifest.json"), &man, &e), "read manifest.json: %s",
                e.msg))
        return tap_done();

    const char *key;
    json_t *c;
    json_object_foreach(refs, key, c) {
        if (json_object_get(c, "num_inference_steps"))
            run_case(key, c, man);
        else if (!strcmp(key, "ddpm"))
            run_ddpm(c, man);
    }
    spacings();
    parameterisations();
    refusals();
    tables();
    ddim_device();

    tap_diag("worst errors per scheduler over every reference tensor (relative L2 per step, max |err|):");
    for (int i = 0; i < 8 && summary[i].name; i++)
        tap_diag("  %-16s rel L2 %.3g   max |err| %.3g", summary[i].name, summary[i].rel, summary[i].maxabs);
    json_decref(refs);
    json_decref(man);
    db_safetensors_close(st);
    db_tindex_free(&ix);
    return tap_done();
}
