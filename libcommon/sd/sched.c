/* Diffusion schedulers (see sched.h): tables, schedules and steps as
 * diffusers 0.27.2 computes them.
 *
 * Reading guide.  diffusers keeps its tables in float32 torch tensors and
 * steps with 0-dim float32 tensors, so every scalar coefficient below is a
 * C float and each line performs one rounded float32 operation, in the order
 * Python evaluates the diffusers expression (quoted above each step).  The
 * schedules go through numpy in double (linspace, arange, interp, round half
 * to even) and are cast to float32 where diffusers casts.  This file must be
 * compiled without FMA contraction (GCC's -std=c11 default), except where
 * fmaf() is written out to mimic torch's own fused arithmetic. */
#include "sched.h"
#include "../io/json.h"

/* No fused multiply-adds but the ones written as fmaf(): GCC's -std=c11
 * already turns contraction off; clang needs the pragma (GCC warns on it). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include "kernels/ddim_step.h" /* (after the pragma: its loop is this file's) */

#include <errno.h>
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum kind { K_DDPM, K_DDIM, K_PNDM, K_EULER, K_EULER_A, K_DPM, K_NKIND };
#define KB(k) (1u << (k))
#define K_ALL (KB(K_NKIND) - 1u)

enum { SP_LEADING, SP_TRAILING, SP_LINSPACE };
enum { BS_LINEAR, BS_SCALED_LINEAR, BS_SQUAREDCOS, BS_SIGMOID };
enum { VT_FIXED_SMALL, VT_FIXED_SMALL_LOG, VT_FIXED_LARGE };

/* Bounds that keep tables and schedules sane; diffusers has none. */
#define MAX_TRAIN_TIMESTEPS 100000

static const struct {
    const char *name;
    enum kind kind;
    int karras; /* 1: use_karras_sigmas forced on */
} kinds[] = {
    {"ddim", K_DDIM, 0},  {"pndm", K_PNDM, 0},         {"euler", K_EULER, 0},           {"euler_a", K_EULER_A, 0},
    {"dpmpp_2m", K_DPM, 0}, {"dpmpp_2m_karras", K_DPM, 1}, {"ddpm", K_DDPM, 0},
};
#define NKINDS (sizeof kinds / sizeof kinds[0])

const char *const db_sched_names[] = {"ddim", "pndm", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddpm", NULL};

/* The union of the parameters of the six classes (diffusers' names). */
typedef struct conf {
    int64_t num_train_timesteps;
    double beta_start, beta_end;
    int beta_schedule;
    float *trained_betas; /* NULL or num_train_timesteps values */
    db_pred prediction_type;
    int timestep_spacing;
    int64_t steps_offset;
    int rescale_betas_zero_snr;
    int clip_sample;
    double clip_sample_range;
    int set_alpha_to_one;
    int variance_type;      /* DDPM */
    int use_karras_sigmas;  /* Euler, DPM */
    double sigma_min, sigma_max; /* Euler; NAN = None */
    int timestep_continuous;     /* Euler timestep_type */
    int solver_heun;             /* DPM solver_type */
    int lower_order_final, euler_at_final, use_lu_lambdas, final_sigma_min;
    double lambda_min_clipped;
} conf;

struct db_sched {
    enum kind kind;
    const char *name;
    conf c;
    int ntrain;
    float *betas, *acp; /* (ntrain,) */
    float final_acp;    /* DDIM/PNDM: alpha product "before" t = 0 */
    float *train_sigmas; /* (ntrain,) sqrt((1 - acp) / acp), Euler/DPM */
    double eta;
    /* schedule */
    int nsteps, ninfer; /* model calls; the num_inference_steps asked for */
    double *ts;         /* (nsteps,) */
    float *sig;         /* (nsteps + 1,) Euler/DPM */
    float init_sigma;
    /* sampler state */
    int next;
    size_t n;
    float *ets[4]; /* PNDM: model outputs, ets[0] newest */
    int nets;
    float *cur;  /* PNDM cur_sample; DPM current x0 */
    float *prev; /* DPM previous x0 */
    int lower_order_nums;
};

/* ---- numpy / torch replicas -------------------------------------------------- */

/* torch.linspace(start, end, steps, dtype=float32) on CPU (PyTorch 1.13 with
 * its AVX2 kernel, the capability the reference ran with): elements come in
 * vectors of 8 from Vectorized::arange(base, step) = base + k*step, two
 * vectors per loop turn, and the tail from the scalar lambda; base is counted
 * from `start` below halfway and back from `end` above; every a + b*c is
 * fused (the kernel is built with -mfma).  Checked bit for bit against the
 * reference betas. */
static void torch_linspace_f32(float start, float end, int64_t steps, float *out)
{
    if (steps == 1) {
        out[0] = start;
        return;
    }
    const float step = (end - start) / (float)(steps - 1);
    const int64_t halfway = steps / 2, V = 8;
    int64_t i = 0;
    for (; i <= steps - 2 * V; i += 2 * V) /* two vectors per turn */
        for (int64_t j = i; j < i + 2 * V; j += V) {
            float base = j < halfway ? fmaf(step, (float)j, start) : fmaf(-step, (float)(steps - j - 1), end);
            for (int64_t k = 0; k < V; k++)
                out[j + k] = fmaf((float)k, step, base);
        }
    for (; i < steps; i++)
        out[i] = i < halfway ? fmaf(step, (float)i, start) : fmaf(-step, (float)(steps - i - 1), end);
}

/* torch.cumprod on a float32 CPU tensor accumulates in double. */
static void torch_cumprod_f32(const float *a, int64_t n, float *out)
{
    double acc = 1.0;
    for (int64_t i = 0; i < n; i++) {
        acc *= a[i];
        out[i] = (float)acc;
    }
}

/* np.linspace(start, stop, num) in double: i * step + start, last = stop. */
static void np_linspace(double start, double stop, int64_t num, double *y)
{
    if (num == 1) {
        y[0] = start;
        return;
    }
    double div = (double)(num - 1), delta = stop - start, step = delta / div;
    for (int64_t i = 0; i < num; i++) {
        double v;
        if (step == 0) {
            v = (double)i / div;
            v = v * delta;
        } else {
            v = (double)i * step;
        }
        y[i] = v + start;
    }
    y[num - 1] = stop;
}

/* np.arange(start, stop, step) for float arguments: length
 * ceil((stop - start) / step), y[0] = start, y[1] = start + step, then
 * y[i] = start + i * (y[1] - y[0]) (numpy's DOUBLE_fill).  *len = 0 when empty. */
static int np_arange(double start, double stop, double step, double **out, int64_t *len, db_err *err)
{
    double l = ceil((stop - start) / step);
    if (!(l > 0)) {
        *out = NULL;
        *len = 0;
        return 0;
    }
    if (l > MAX_TRAIN_TIMESTEPS + 1.0)
        return db_err_set(err, DB_EUSAGE, "timestep range of %g entries is too long", l);
    int64_t n = (int64_t)l;
    double *y = malloc((size_t)n * sizeof *y);
    if (!y)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    y[0] = start;
    if (n > 1) {
        y[1] = start + step;
        double delta = y[1] - y[0];
        for (int64_t i = 2; i < n; i++)
            y[i] = start + (double)i * delta;
    }
    *out = y;
    *len = n;
    return 0;
}

/* np.interp(x, arange(len(fp)), fp) in double (numpy's arr_interp with
 * integer abscissae: slope (fp[j+1] - fp[j]) / 1, exact hits return fp[j]). */
static double np_interp_index(double x, const float *fp, int64_t len)
{
    if (isnan(x))
        return x;
    if (x <= 0)
        return fp[0];
    if (x >= (double)(len - 1))
        return fp[len - 1];
    int64_t j = (int64_t)floor(x);
    if ((double)j == x)
        return fp[j];
    double slope = ((double)fp[j + 1] - (double)fp[j]) / 1.0;
    return slope * (x - (double)j) + (double)fp[j];
}

/* diffusers' _sigma_to_t: fractional training index of sigma by linear
 * interpolation in log sigma (log_sigmas float32, increasing with t). */
static double sigma_to_t(double sigma, const float *log_sigmas, int64_t len)
{
    double ls = log(fmax(sigma, 1e-10));
    int64_t low = 0;
    /* cumsum(dists >= 0).argmax(): the last index with log_sigmas <= ls */
    for (int64_t i = 0; i < len; i++)
        if (ls - (double)log_sigmas[i] >= 0)
            low = i;
    if (low > len - 2)
        low = len - 2;
    int64_t high = low + 1;
    double lo = log_sigmas[low], hi = log_sigmas[high];
    double w = (lo - ls) / (lo - hi);
    w = w < 0 ? 0 : w > 1 ? 1 : w; /* np.clip keeps NaN */
    return (1.0 - w) * (double)low + w * (double)high;
}

/* diffusers' _convert_to_karras: rho = 7 ramp from sigma_max to sigma_min. */
static void karras_sigmas(double sigma_min, double sigma_max, int64_t n, double *out)
{
    const double rho = 7.0;
    double min_inv = pow(sigma_min, 1.0 / rho), max_inv = pow(sigma_max, 1.0 / rho);
    np_linspace(0.0, 1.0, n, out); /* the ramp */
    for (int64_t i = 0; i < n; i++)
        out[i] = pow(max_inv + out[i] * (min_inv - max_inv), rho);
}

/* torch.log on a float32 CPU tensor: SLEEF's logf_u1 (AVX2 build, fused
 * multiply-adds), in scalar form: m = d / 2^e in [0.75, 1.5),
 * log d = e ln 2 + 2 atanh((m - 1) / (m + 1)) with the leading terms in
 * double-float (a value and its rounding error).  Reproduced for the same
 * reason as f_exp below: its last bit can differ from the correctly rounded
 * log. */
typedef struct df {
    float x, y;
} df;

static df df_add2(float a, float b) /* dfadd2_vf2_vf_vf */
{
    float s = a + b, v = s - a;
    return (df){s, (a - (s - v)) + (b - v)};
}

static float f_log(float d)
{
    if (isnan(d) || d < 0)
        return NAN;
    if (d == 0)
        return -INFINITY;
    if (isinf(d))
        return INFINITY;
    const int tiny = d < FLT_MIN;
    if (tiny)
        d = d * 18446744073709551616.0f; /* 2^64 */
    float d43 = d * (1.0f / 0.75f);
    uint32_t bits;
    memcpy(&bits, &d43, 4);
    int e = (int)((bits >> 23) & 0xff) - 0x7f; /* vilogb2k */
    memcpy(&bits, &d, 4);
    bits += (uint32_t)(-e) << 23; /* vldexp3: m = d 2^-e */
    float m;
    memcpy(&m, &bits, 4);
    if (tiny)
        e -= 64;
    /* s = (ln 2 as double-float) * e */
    const float ef = (float)e, l2h = 0.69314718246459960938f, l2l = -1.904654323148236017e-09f;
    df sv;
    sv.x = l2h * ef;
    sv.y = fmaf(l2l, ef, fmaf(l2h, ef, -sv.x));
    /* x = (m - 1) / (m + 1) in double-float (dfdiv with FMA) */
    df n = df_add2(-1.0f, m), q = df_add2(1.0f, m), x;
    float t = 1.0f / q.x;
    x.x = n.x * t;
    float u = fmaf(t, n.x, -x.x);
    float v = fmaf(-q.y, t, fmaf(-q.x, t, 1.0f));
    x.y = fmaf(x.x, v, fmaf(n.y, t, u));
    float x2 = x.x * x.x;
    float p = 0.3027294874e+0f;
    p = fmaf(p, x2, 0.3996108174e+0f);
    p = fmaf(p, x2, 0.6666694880e+0f);
    /* s = s + 2x (dfadd_vf2_vf2_vf2), then s + x^3 p (dfadd_vf2_vf2_vf) */
    df x2s = {x.x * 2.0f, x.y * 2.0f};
    float s1 = sv.x + x2s.x;
    float e1 = (((sv.x - s1) + x2s.x) + sv.y) + x2s.y;
    float w = (x2 * x.x) * p;
    float s2 = s1 + w;
    float e2 = ((s1 - s2) + w) + e1;
    return s2 + e2;
}

/* torch.exp on a float32 CPU tensor: SLEEF's expf_u10 in its AVX2 build
 * (Sleef_expf8_u10avx2, which PyTorch 1.13 calls through Vectorized<float>
 * even for one element): Cody-Waite reduction by ln 2 and a degree-6
 * polynomial, every multiply-add fused.  Its last bit sometimes differs from
 * the correctly rounded exp (the DPM-Solver reference shows it), so it is
 * reproduced rather than approximated. */
static float f_exp(float d)
{
    if (isnan(d))
        return d;
    if (d < -104.0f)
        return 0.0f;
    if (d > 100.0f)
        return INFINITY;
    const float R_LN2f = 1.442695040888963407359924681001892137426645954152985934135449406931f;
    const float L2Uf = 0.693145751953125f, L2Lf = 1.428606765330187045e-06f;
    float qf = rintf(d * R_LN2f); /* cvtps_epi32: nearest, ties to even */
    int q = (int)qf;
    float s = fmaf(qf, -L2Uf, d);
    s = fmaf(qf, -L2Lf, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    /* vldexp2: u * 2^(q >> 1) * 2^(q - (q >> 1)), exact in this range */
    return ldexpf(ldexpf(u, q >> 1), q - (q >> 1));
}

/* ---- config ------------------------------------------------------------------ */

/* A number, or the strings Python's json writes for non-finite floats.
 * Returns 1 when present and not null, 0 when absent or null, -1 on error. */
static int get_num(const json_t *cfg, const char *key, double *out, db_err *err)
{
    const json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v))
        return 0;
    if (json_is_number(v)) {
        *out = json_number_value(v);
        return 1;
    }
    if (json_is_string(v)) {
        const char *s = json_string_value(v);
        if (!strcmp(s, "NaN"))
            *out = NAN;
        else if (!strcmp(s, "Infinity"))
            *out = INFINITY;
        else if (!strcmp(s, "-Infinity"))
            *out = -INFINITY;
        else
            return db_err_set(err, DB_EFORMAT, "key '%s': want a number, got \"%s\"", key, s);
        return 1;
    }
    return db_err_set(err, DB_EFORMAT, "key '%s': want a number, got %s", key, db_json_type_name(v));
}

static int get_int(const json_t *cfg, const char *key, int64_t lo, int64_t hi, int64_t *out, db_err *err)
{
    const json_t *v = json_object_get(cfg, key);
    if (!v || json_is_null(v))
        return 0;
    double d;
    if (json_is_integer(v))
        d = (double)json_integer_value(v);
    else if (json_is_real(v) && json_real_value(v) == floor(json_real_value(v)))
        d = json_real_value(v);
    else
        return db_err_set(err, DB_EFORMAT, "key '%s': want an integer, got %s", key, db_json_type_name(v));
    if (d < (double)lo || d > (double)hi)
        return db_err_set(err, DB_EFORMAT, "key '%s': %.17g outside [%lld, %lld]", key, d, (long long)lo,
                          (long long)hi);
    *out = (int64_t)d;
    return 1;
}

/* Booleans with Python's truthiness for what configs actually hold:
 * true/false, 0/1, null (false). */
static int get_bool(const json_t *cfg, const char *key, int *out, db_err *err)
{
    const json_t *v = json_object_get(cfg, key);
    if (!v)
        return 0;
    if (json_is_boolean(v))
        *out = json_is_true(v);
    else if (json_is_null(v))
        *out = 0;
    else if (json_is_integer(v))
        *out = json_integer_value(v) != 0;
    else
        return db_err_set(err, DB_EFORMAT, "key '%s': want true or false, got %s", key, db_json_type_name(v));
    return 1;
}

/* One of `names` (NULL-terminated); *out = its index.  `unsupported`
 * (NULL-terminated, may be NULL) lists values diffusers knows that we refuse. */
static int get_enum(const json_t *cfg, const char *key, const char *const *names, const char *const *unsupported,
                    int *out, db_err *err)
{
    const json_t *v = json_object_get(cfg, key);
    if (!v)
        return 0;
    if (!json_is_string(v))
        return db_err_set(err, DB_EFORMAT, "key '%s': want a string, got %s", key, db_json_type_name(v));
    const char *s = json_string_value(v);
    for (int i = 0; names[i]; i++)
        if (!strcmp(s, names[i])) {
            *out = i;
            return 1;
        }
    for (int i = 0; unsupported && unsupported[i]; i++)
        if (!strcmp(s, unsupported[i]))
            return db_err_set(err, DB_EUNSUPP, "key '%s': \"%s\" is not supported", key, s);
    char list[256] = "";
    for (int i = 0; names[i]; i++) {
        size_t l = strlen(list);
        snprintf(list + l, sizeof list - l, "%s%s", i ? ", " : "", names[i]);
    }
    return db_err_set(err, DB_EFORMAT, "key '%s': unknown value \"%s\" (expected %s)", key, s, list);
}

static void conf_defaults(conf *c, enum kind k)
{
    memset(c, 0, sizeof *c);
    c->num_train_timesteps = 1000;
    c->beta_start = 0.0001;
    c->beta_end = 0.02;
    c->beta_schedule = BS_LINEAR;
    c->prediction_type = DB_PRED_EPSILON;
    c->timestep_spacing = (k == K_DDPM || k == K_DDIM || k == K_PNDM) ? SP_LEADING : SP_LINSPACE;
    c->clip_sample = 1; /* DDPM, DDIM */
    c->clip_sample_range = 1.0;
    c->set_alpha_to_one = k == K_DDIM; /* DDIM True, PNDM False */
    c->variance_type = VT_FIXED_SMALL;
    c->sigma_min = c->sigma_max = NAN;
    c->lower_order_final = 1;
    c->lambda_min_clipped = -INFINITY;
}

static int parse_conf(conf *c, enum kind k, const json_t *cfg, db_err *err)
{
    static const char *const spacings[] = {"leading", "trailing", "linspace", NULL};
    static const char *const schedules[] = {"linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", NULL};
    static const char *const preds[] = {"epsilon", "v_prediction", "sample", NULL};
    const unsigned bit = KB(k);
    int r, b;
    double d;
    int64_t i64;

    if (!cfg)
        return 0;
    if (!json_is_object(cfg))
        return db_err_set(err, DB_EFORMAT, "want a JSON object, got %s", db_json_type_name(cfg));

    if ((r = get_int(cfg, "num_train_timesteps", 2, MAX_TRAIN_TIMESTEPS, &i64, err)) < 0)
        return -1;
    if (r)
        c->num_train_timesteps = i64;
    if ((r = get_num(cfg, "beta_start", &d, err)) < 0)
        return -1;
    if (r)
        c->beta_start = d;
    if ((r = get_num(cfg, "beta_end", &d, err)) < 0)
        return -1;
    if (r)
        c->beta_end = d;
    if (get_enum(cfg, "beta_schedule", schedules, NULL, &c->beta_schedule, err) < 0)
        return -1;
    if (c->beta_schedule == BS_SIGMOID && k != K_DDPM)
        return db_err_set(err, DB_EFORMAT, "key 'beta_schedule': \"sigmoid\" exists only for ddpm");
    int pt = (int)c->prediction_type;
    if (get_enum(cfg, "prediction_type", preds, NULL, &pt, err) < 0)
        return -1;
    c->prediction_type = (db_pred)pt;
    if (get_enum(cfg, "timestep_spacing", spacings, NULL, &c->timestep_spacing, err) < 0)
        return -1;
    if ((r = get_int(cfg, "steps_offset", -MAX_TRAIN_TIMESTEPS, MAX_TRAIN_TIMESTEPS, &i64, err)) < 0)
        return -1;
    if (r)
        c->steps_offset = i64;

    const json_t *tb = json_object_get(cfg, "trained_betas");
    if (tb && !json_is_null(tb)) {
        if (!json_is_array(tb))
            return db_err_set(err, DB_EFORMAT, "key 'trained_betas': want an array of numbers, got %s", db_json_type_name(tb));
        size_t n = json_array_size(tb);
        if (n != (size_t)c->num_train_timesteps)
            return db_err_set(err, DB_EFORMAT, "key 'trained_betas': %zu values for num_train_timesteps %lld", n,
                              (long long)c->num_train_timesteps);
        c->trained_betas = malloc(n * sizeof *c->trained_betas);
        if (!c->trained_betas)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        for (size_t j = 0; j < n; j++) {
            const json_t *v = json_array_get(tb, j);
            if (!json_is_number(v))
                return db_err_set(err, DB_EFORMAT, "key 'trained_betas': entry %zu is %s", j, db_json_type_name(v));
            double beta = json_number_value(v);
            if (!(beta >= 0 && beta <= 1))
                return db_err_set(err, DB_EFORMAT, "key 'trained_betas': entry %zu = %g outside [0, 1]", j, beta);
            c->trained_betas[j] = (float)beta; /* torch.tensor(..., float32) */
        }
    }

    if (bit & (K_ALL & ~KB(K_PNDM)))
        if (get_bool(cfg, "rescale_betas_zero_snr", &c->rescale_betas_zero_snr, err) < 0)
            return -1;
    if (bit & (KB(K_DDPM) | KB(K_DDIM))) {
        if (get_bool(cfg, "clip_sample", &c->clip_sample, err) < 0)
            return -1;
        if ((r = get_num(cfg, "clip_sample_range", &d, err)) < 0)
            return -1;
        if (r)
            c->clip_sample_range = d;
    }
    if (bit & (KB(K_DDPM) | KB(K_DDIM) | KB(K_DPM))) {
        b = 0;
        if (get_bool(cfg, "thresholding", &b, err) < 0)
            return -1;
        if (b)
            return db_err_set(err, DB_EUNSUPP, "key 'thresholding': dynamic thresholding is not supported");
    }
    if (bit & (KB(K_DDIM) | KB(K_PNDM)))
        if (get_bool(cfg, "set_alpha_to_one", &c->set_alpha_to_one, err) < 0)
            return -1;
    if (k == K_PNDM) {
        b = 0; /* diffusers' default, which SD's configs override */
        if (get_bool(cfg, "skip_prk_steps", &b, err) < 0)
            return -1;
        if (!b)
            return db_err_set(err, DB_EUNSUPP,
                              "key 'skip_prk_steps': false (Runge-Kutta warm-up steps) is not supported; "
                              "Stable Diffusion configs set it true");
        if (c->prediction_type == DB_PRED_SAMPLE)
            return db_err_set(err, DB_EUNSUPP, "key 'prediction_type': \"sample\" is not supported by pndm");
    }
    if (k == K_DDPM) {
        static const char *const vt[] = {"fixed_small", "fixed_small_log", "fixed_large", NULL};
        static const char *const vt_no[] = {"fixed_large_log", "learned", "learned_range", NULL};
        if (get_enum(cfg, "variance_type", vt, vt_no, &c->variance_type, err) < 0)
            return -1;
    }
    if (k == K_EULER_A && c->prediction_type == DB_PRED_SAMPLE)
        return db_err_set(err, DB_EUNSUPP, "key 'prediction_type': \"sample\" is not supported by euler_a");
    if (k == K_EULER) {
        static const char *const it[] = {"linear", NULL}, *const it_no[] = {"log_linear", NULL};
        static const char *const tt[] = {"discrete", "continuous", NULL};
        int v = 0;
        if (get_enum(cfg, "interpolation_type", it, it_no, &v, err) < 0)
            return -1;
        if (get_enum(cfg, "timestep_type", tt, NULL, &c->timestep_continuous, err) < 0)
            return -1;
        if (get_num(cfg, "sigma_min", &c->sigma_min, err) < 0 || get_num(cfg, "sigma_max", &c->sigma_max, err) < 0)
            return -1;
    }
    if (bit & (KB(K_EULER) | KB(K_DPM)))
        if (get_bool(cfg, "use_karras_sigmas", &c->use_karras_sigmas, err) < 0)
            return -1;
    if (k == K_DPM) {
        /* diffusers maps the DEIS/UniPC names logrho, bh1, bh2 to midpoint */
        static const char *const st[] = {"midpoint", "heun", "logrho", "bh1", "bh2", NULL};
        static const char *const fs[] = {"zero", "sigma_min", NULL};
        int sv = 0;
        if (get_enum(cfg, "solver_type", st, NULL, &sv, err) < 0)
            return -1;
        c->solver_heun = sv == 1;
        if (get_bool(cfg, "lower_order_final", &c->lower_order_final, err) < 0 ||
            get_bool(cfg, "euler_at_final", &c->euler_at_final, err) < 0 ||
            get_bool(cfg, "use_lu_lambdas", &c->use_lu_lambdas, err) < 0)
            return -1;
        if (get_enum(cfg, "final_sigmas_type", fs, NULL, &c->final_sigma_min, err) < 0)
            return -1;
        if (get_num(cfg, "lambda_min_clipped", &c->lambda_min_clipped, err) < 0)
            return -1;
        const json_t *vt = json_object_get(cfg, "variance_type");
        if (vt && !json_is_null(vt))
            return db_err_set(err, DB_EUNSUPP, "key 'variance_type': learned variances are not supported by dpmpp_2m");
    }
    /* ranges that keep every later float conversion defined */
    if (!(c->beta_start >= 0 && c->beta_start <= 1))
        return db_err_set(err, DB_EFORMAT, "key 'beta_start': %g outside [0, 1]", c->beta_start);
    if (!(c->beta_end >= 0 && c->beta_end <= 1))
        return db_err_set(err, DB_EFORMAT, "key 'beta_end': %g outside [0, 1]", c->beta_end);
    if (!(c->clip_sample_range >= 0 && c->clip_sample_range <= FLT_MAX))
        return db_err_set(err, DB_EFORMAT, "key 'clip_sample_range': %g is not a finite value >= 0",
                          c->clip_sample_range);
    if (!isnan(c->sigma_min) && !(c->sigma_min > 0 && c->sigma_min <= 1e30))
        return db_err_set(err, DB_EFORMAT, "key 'sigma_min': %g is not in (0, 1e30]", c->sigma_min);
    if (!isnan(c->sigma_max) && !(c->sigma_max > 0 && c->sigma_max <= 1e30))
        return db_err_set(err, DB_EFORMAT, "key 'sigma_max': %g is not in (0, 1e30]", c->sigma_max);
    if (isnan(c->lambda_min_clipped))
        return db_err_set(err, DB_EFORMAT, "key 'lambda_min_clipped': NaN");
    if (fabs(c->lambda_min_clipped) > FLT_MAX) /* beyond float: the same as infinite */
        c->lambda_min_clipped = c->lambda_min_clipped > 0 ? INFINITY : -INFINITY;
    return 0;
}

/* ---- tables -------------------------------------------------------------------- */

/* diffusers' rescale_zero_terminal_snr, in float32 torch arithmetic. */
static int rescale_zero_snr(float *betas, int n, db_err *err)
{
    float *abar = malloc((size_t)n * sizeof *abar);
    if (!abar)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    for (int i = 0; i < n; i++)
        abar[i] = 1.0f - betas[i];
    torch_cumprod_f32(abar, n, abar);
    for (int i = 0; i < n; i++)
        abar[i] = sqrtf(abar[i]);
    float s0 = abar[0], sT = abar[n - 1];
    float scale = s0 / (s0 - sT);
    for (int i = 0; i < n; i++) {
        abar[i] = abar[i] - sT;
        abar[i] = abar[i] * scale;
        abar[i] = abar[i] * abar[i];
    }
    betas[0] = 1.0f - abar[0];
    for (int i = 1; i < n; i++)
        betas[i] = 1.0f - abar[i] / abar[i - 1];
    free(abar);
    return 0;
}

static int build_tables(db_sched *s, db_err *err)
{
    const conf *c = &s->c;
    const int n = s->ntrain;
    s->betas = malloc((size_t)n * sizeof *s->betas);
    s->acp = malloc((size_t)n * sizeof *s->acp);
    if (!s->betas || !s->acp)
        return db_err_set(err, DB_ENOMEM, "out of memory");

    if (c->trained_betas) {
        memcpy(s->betas, c->trained_betas, (size_t)n * sizeof *s->betas);
    } else if (c->beta_schedule == BS_LINEAR) {
        torch_linspace_f32((float)c->beta_start, (float)c->beta_end, n, s->betas);
    } else if (c->beta_schedule == BS_SCALED_LINEAR) {
        /* torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=float32) ** 2 */
        torch_linspace_f32((float)pow(c->beta_start, 0.5), (float)pow(c->beta_end, 0.5), n, s->betas);
        for (int i = 0; i < n; i++)
            s->betas[i] = s->betas[i] * s->betas[i];
    } else if (c->beta_schedule == BS_SQUAREDCOS) {
        /* betas_for_alpha_bar in Python floats, max_beta 0.999 */
        for (int i = 0; i < n; i++) {
            double t1 = (double)i / n, t2 = (double)(i + 1) / n;
            double a1 = cos((t1 + 0.008) / 1.008 * M_PI / 2), a2 = cos((t2 + 0.008) / 1.008 * M_PI / 2);
            double b = 1 - (a2 * a2) / (a1 * a1);
            s->betas[i] = (float)(b < 0.999 ? b : 0.999);
        }
    } else { /* sigmoid (DDPM): sigmoid(linspace(-6, 6)) * (end - start) + start */
        torch_linspace_f32(-6.0f, 6.0f, n, s->betas);
        for (int i = 0; i < n; i++) {
            /* torch.sigmoid: SLEEF exp over pairs of 8-float vectors, std::exp on the tail */
            float x = s->betas[i];
            float ex = i < n - n % 16 ? f_exp(0.0f - x) : (float)exp(-(double)x);
            float sg = 1.0f / (1.0f + ex);
            float v = sg * (float)(c->beta_end - c->beta_start);
            s->betas[i] = v + (float)c->beta_start;
        }
    }
    if (c->rescale_betas_zero_snr && rescale_zero_snr(s->betas, n, err) < 0)
        return -1;

    for (int i = 0; i < n; i++)
        s->acp[i] = 1.0f - s->betas[i];
    torch_cumprod_f32(s->acp, n, s->acp);
    /* Euler and DPM avoid an infinite last sigma under zero terminal SNR */
    if (c->rescale_betas_zero_snr && (s->kind == K_EULER || s->kind == K_EULER_A || s->kind == K_DPM))
        s->acp[n - 1] = 0x1p-24f;
    /* diffusers would go on and produce NaN images; say why instead */
    const int sigmas = s->kind == K_EULER || s->kind == K_EULER_A || s->kind == K_DPM;
    for (int i = 0; i < n; i++) {
        if (!(s->betas[i] >= 0.0f && s->betas[i] <= 1.0f))
            return db_err_set(err, DB_EFORMAT, "beta[%d] = %g is outside [0, 1] (check 'beta_start', 'beta_end', "
                              "'trained_betas')", i, (double)s->betas[i]);
        /* only the terminal alpha product may be 0 (zero terminal SNR), and
         * not where sigmas = sqrt((1 - acp) / acp) are needed */
        if (!(s->acp[i] > 0.0f || (s->acp[i] == 0.0f && i == n - 1 && !sigmas)))
            return db_err_set(err, DB_EFORMAT, "alphas_cumprod[%d] = %g: the betas leave no signal (check "
                              "'beta_start', 'beta_end', 'trained_betas')", i, (double)s->acp[i]);
    }
    s->final_acp = c->set_alpha_to_one ? 1.0f : s->acp[0];

    if (s->kind == K_EULER || s->kind == K_EULER_A || s->kind == K_DPM) {
        s->train_sigmas = malloc((size_t)n * sizeof *s->train_sigmas);
        if (!s->train_sigmas)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        float mx = 0;
        for (int i = 0; i < n; i++) {
            /* ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5 */
            float q = (1.0f - s->acp[i]) / s->acp[i];
            s->train_sigmas[i] = sqrtf(q);
            mx = fmaxf(mx, s->train_sigmas[i]);
        }
        if (s->kind != K_DPM) /* before set_timesteps, as diffusers' property */
            s->init_sigma = c->timestep_spacing == SP_LEADING ? sqrtf(mx * mx + 1.0f) : mx;
    }
    return 0;
}

/* ---- create / free ----------------------------------------------------------- */

int db_sched_create(db_sched **out, const char *name, const json_t *config, db_err *err)
{
    *out = NULL;
    size_t which = NKINDS;
    for (size_t i = 0; name && i < NKINDS; i++)
        if (!strcmp(name, kinds[i].name))
            which = i;
    if (which == NKINDS) {
        char list[256] = "";
        for (int i = 0; db_sched_names[i]; i++) {
            size_t l = strlen(list);
            snprintf(list + l, sizeof list - l, "%s%s", i ? ", " : "", db_sched_names[i]);
        }
        return db_err_set(err, DB_EUSAGE, "unknown scheduler '%s' (expected one of: %s)", name ? name : "(null)",
                          list);
    }
    db_sched *s = calloc(1, sizeof *s);
    if (!s)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    s->kind = kinds[which].kind;
    s->name = kinds[which].name;
    s->init_sigma = 1.0f;
    conf_defaults(&s->c, s->kind);
    if (parse_conf(&s->c, s->kind, config, err) < 0) {
        db_err_prefix(err, "scheduler '%s' config", s->name);
        db_sched_free(s);
        return -1;
    }
    if (kinds[which].karras)
        s->c.use_karras_sigmas = 1;
    s->ntrain = (int)s->c.num_train_timesteps;
    if (build_tables(s, err) < 0) {
        db_err_prefix(err, "scheduler '%s' config", s->name);
        db_sched_free(s);
        return -1;
    }
    *out = s;
    return 0;
}

static void free_state(db_sched *s)
{
    for (int i = 0; i < 4; i++) {
        free(s->ets[i]);
        s->ets[i] = NULL;
    }
    free(s->cur);
    free(s->prev);
    s->cur = s->prev = NULL;
    s->n = 0;
    s->nets = 0;
    s->next = 0;
    s->lower_order_nums = 0;
}

void db_sched_free(db_sched *s)
{
    if (!s)
        return;
    free_state(s);
    free(s->c.trained_betas);
    free(s->betas);
    free(s->acp);
    free(s->train_sigmas);
    free(s->ts);
    free(s->sig);
    free(s);
}

const char *db_sched_name(const db_sched *s)
{
    return s->name;
}

db_pred db_sched_prediction(const db_sched *s)
{
    return s->c.prediction_type;
}

int db_sched_num_train_timesteps(const db_sched *s)
{
    return s->ntrain;
}

const float *db_sched_betas(const db_sched *s)
{
    return s->betas;
}

const float *db_sched_alphas_cumprod(const db_sched *s)
{
    return s->acp;
}

int db_sched_set_eta(db_sched *s, double eta, db_err *err)
{
    if (!(eta >= 0.0 && eta <= FLT_MAX))
        return db_err_set(err, DB_EUSAGE, "eta %g: want a finite value >= 0", eta);
    s->eta = eta;
    return 0;
}

/* ---- schedules ----------------------------------------------------------------- */

/* Integer timesteps of DDPM/DDIM (descending), PNDM's ascending base list, and
 * DPM's, each exactly as its set_timesteps computes them.  *out gets `*len`
 * values in double. */
static int spaced_timesteps(const db_sched *s, int steps, double **out, int64_t *len, db_err *err)
{
    const int64_t N = s->ntrain, off = s->c.steps_offset;
    const int sp = s->c.timestep_spacing;
    const int dpm = s->kind == K_DPM;
    double *t = NULL;
    int64_t n = 0;

    if (dpm) {
        /* searchsorted(flip(lambda_t), lambda_min_clipped): torch casts the
         * value to the table's float32; lambda_t = log(alpha_t) - log(sigma_t) */
        float lim = (float)s->c.lambda_min_clipped;
        int64_t lo = 0, hi = N;
        while (lo < hi) {
            int64_t mid = (lo + hi) / 2;
            float a = s->acp[N - 1 - mid];
            float lam = f_log(sqrtf(a)) - f_log(sqrtf(1.0f - a));
            if (lam < lim)
                lo = mid + 1;
            else
                hi = mid;
        }
        int64_t last = N - lo;
        if (last < 1)
            return db_err_set(err, DB_EUSAGE, "lambda_min_clipped %g leaves no timesteps", s->c.lambda_min_clipped);
        n = steps;
        t = malloc((size_t)(steps + 1) * sizeof *t);
        if (!t)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        if (sp == SP_LINSPACE) {
            /* np.linspace(0, last - 1, steps + 1).round()[::-1][:-1] */
            np_linspace(0.0, (double)(last - 1), steps + 1, t);
            for (int i = 0; i < steps / 2; i++) { /* reverse y[1 .. steps] in place, then shift down */
                double x = t[i + 1];
                t[i + 1] = t[steps - i];
                t[steps - i] = x;
            }
            for (int i = 0; i < steps; i++)
                t[i] = rint(t[i + 1]);
        } else if (sp == SP_LEADING) {
            int64_t r = last / (steps + 1);
            for (int i = 0; i < steps; i++)
                t[i] = (double)((int64_t)(steps - i) * r + off);
        } else {
            double *a;
            if (np_arange((double)last, 0.0, -((double)N / steps), &a, &n, err) < 0) {
                free(t);
                return -1;
            }
            free(t);
            t = a;
            for (int64_t i = 0; i < n; i++)
                t[i] = rint(t[i]) - 1;
        }
        *out = t;
        *len = n;
        return 0;
    }

    /* DDPM, DDIM (descending) and PNDM (ascending) */
    const int asc = s->kind == K_PNDM;
    if (sp == SP_TRAILING) {
        if (np_arange((double)N, 0.0, -((double)N / steps), &t, &n, err) < 0)
            return -1;
        for (int64_t i = 0; i < n; i++)
            t[i] = rint(t[i]) - 1;
        if (asc)
            for (int64_t i = 0; i < n / 2; i++) {
                double x = t[i];
                t[i] = t[n - 1 - i];
                t[n - 1 - i] = x;
            }
    } else {
        n = steps;
        t = malloc((size_t)n * sizeof *t);
        if (!t)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        if (sp == SP_LINSPACE) {
            np_linspace(0.0, (double)(N - 1), steps, t);
            for (int64_t i = 0; i < n; i++)
                t[i] = rint(t[i]);
        } else {
            int64_t r = N / steps;
            for (int64_t i = 0; i < n; i++)
                t[i] = (double)(i * r + off);
        }
        if (!asc)
            for (int64_t i = 0; i < n / 2; i++) {
                double x = t[i];
                t[i] = t[n - 1 - i];
                t[n - 1 - i] = x;
            }
    }
    *out = t;
    *len = n;
    return 0;
}

/* Euler's float32 timesteps (descending). */
static int euler_timesteps(const db_sched *s, int steps, double **out, int64_t *len, db_err *err)
{
    const int64_t N = s->ntrain;
    double *t = NULL;
    int64_t n = steps;
    if (s->c.timestep_spacing == SP_TRAILING) {
        /* np.arange(N, 0, -N / steps).round().astype(float32) - 1 (float32) */
        if (np_arange((double)N, 0.0, -((double)N / steps), &t, &n, err) < 0)
            return -1;
        for (int64_t i = 0; i < n; i++)
            t[i] = (double)((float)rint(t[i]) - 1.0f);
    } else {
        t = malloc((size_t)n * sizeof *t);
        if (!t)
            return db_err_set(err, DB_ENOMEM, "out of memory");
        if (s->c.timestep_spacing == SP_LINSPACE) {
            /* np.linspace(0, N - 1, steps, dtype=float32)[::-1] */
            np_linspace(0.0, (double)(N - 1), steps, t);
            for (int64_t i = 0; i < n / 2; i++) {
                double x = t[i];
                t[i] = t[n - 1 - i];
                t[n - 1 - i] = x;
            }
            for (int64_t i = 0; i < n; i++)
                t[i] = (float)t[i];
        } else {
            /* (arange(steps) * (N // steps)).round()[::-1].astype(float32) + steps_offset */
            int64_t r = N / steps;
            for (int64_t i = 0; i < n; i++)
                t[i] = (double)((float)((n - 1 - i) * r) + (float)s->c.steps_offset);
        }
    }
    *out = t;
    *len = n;
    return 0;
}

static int check_range(const db_sched *s, db_err *err)
{
    for (int i = 0; i < s->nsteps; i++)
        if (!(s->ts[i] >= 0 && s->ts[i] <= s->ntrain - 1))
            return db_err_set(err, DB_EUSAGE,
                              "timestep %g (call %d) is outside [0, %d]: check 'steps_offset' and the step count",
                              s->ts[i], i, s->ntrain - 1);
    return 0;
}

/* Euler/DPM: sigmas (n + 1, into s->sig) for the n timesteps t, which the
 * Karras and Lu variants replace; also Euler's init_noise_sigma. */
static int sigma_schedule(db_sched *s, double *t, int64_t n, db_err *err)
{
    const int64_t N = s->ntrain;
    double *sg = malloc((size_t)(n + 1) * sizeof *sg);
    float *ls = malloc((size_t)N * sizeof *ls);
    s->sig = malloc((size_t)(n + 1) * sizeof *s->sig);
    if (!sg || !ls || !s->sig) {
        free(sg);
        free(ls);
        return db_err_set(err, DB_ENOMEM, "out of memory");
    }
    for (int64_t i = 0; i < N; i++) /* np.log of the float32 sigmas (numpy's own SIMD log; */
        ls[i] = (float)log((double)s->train_sigmas[i]); /* only seen through rounding) */
    const int karras = s->c.use_karras_sigmas;
    if (s->kind == K_DPM && karras) {
        /* karras from the training sigmas; timesteps rounded to integers */
        karras_sigmas(s->train_sigmas[0], s->train_sigmas[N - 1], n, sg);
        for (int64_t i = 0; i < n; i++)
            t[i] = rint(sigma_to_t(sg[i], ls, N));
    } else if (s->kind == K_DPM && s->c.use_lu_lambdas) {
        /* diffusers ramps log sigma linearly (its "lambdas") */
        double lmin = ls[0], lmax = ls[N - 1];
        np_linspace(0.0, 1.0, n, sg);
        for (int64_t i = 0; i < n; i++) {
            sg[i] = exp(lmax + sg[i] * (lmin - lmax));
            t[i] = rint(sigma_to_t(sg[i], ls, N));
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            sg[i] = np_interp_index(t[i], s->train_sigmas, N);
        if (karras) { /* Euler: from the interpolated sigmas; float timesteps */
            double smin = isnan(s->c.sigma_min) ? sg[n - 1] : s->c.sigma_min;
            double smax = isnan(s->c.sigma_max) ? sg[0] : s->c.sigma_max;
            karras_sigmas(smin, smax, n, sg);
            for (int64_t i = 0; i < n; i++)
                t[i] = (float)sigma_to_t(sg[i], ls, N);
        }
    }
    for (int64_t i = 0; i < n; i++)
        s->sig[i] = (float)sg[i];
    if (s->kind == K_DPM && s->c.final_sigma_min) {
        float q = (1.0f - s->acp[0]) / s->acp[0];
        s->sig[n] = sqrtf(q);
    } else {
        s->sig[n] = 0.0f;
    }
    if (s->kind == K_EULER && s->c.timestep_continuous && s->c.prediction_type == DB_PRED_V)
        for (int64_t i = 0; i < n; i++) /* 0.25 * sigma.log() in float32 */
            t[i] = 0.25f * f_log(s->sig[i]);
    if (s->kind != K_DPM) {
        float mx = 0;
        for (int64_t i = 0; i <= n; i++)
            mx = fmaxf(mx, s->sig[i]);
        s->init_sigma = s->c.timestep_spacing == SP_LEADING ? sqrtf(mx * mx + 1.0f) : mx;
    }
    free(sg);
    free(ls);
    return 0;
}

int db_sched_set_timesteps(db_sched *s, int steps, db_err *err)
{
    free(s->ts);
    free(s->sig);
    s->ts = NULL;
    s->sig = NULL;
    s->nsteps = 0;
    free_state(s);
    if (steps < 1 || steps > s->ntrain)
        return db_err_set(err, DB_EUSAGE, "scheduler '%s': %d steps: want 1 to num_train_timesteps (%d)", s->name,
                          steps, s->ntrain);
    s->ninfer = steps;
    double *t = NULL;
    int64_t n = 0;

    switch (s->kind) {
    case K_DDPM:
    case K_DDIM:
        if (spaced_timesteps(s, steps, &t, &n, err) < 0)
            goto fail;
        break;
    case K_PNDM: {
        /* PLMS only: [ts[:-1], ts[-2:-1], ts[-1:]][::-1] from ascending ts,
         * so the second-highest timestep is visited twice */
        double *base;
        int64_t nb;
        if (spaced_timesteps(s, steps, &base, &nb, err) < 0)
            goto fail;
        t = malloc((size_t)(nb + 1) * sizeof *t);
        if (!t) {
            free(base);
            db_err_set(err, DB_ENOMEM, "out of memory");
            goto fail;
        }
        n = 0;
        for (int64_t i = 0; i + 1 < nb; i++)
            t[n++] = base[i];
        if (nb >= 2)
            t[n++] = base[nb - 2];
        if (nb >= 1)
            t[n++] = base[nb - 1];
        for (int64_t i = 0; i < n / 2; i++) {
            double x = t[i];
            t[i] = t[n - 1 - i];
            t[n - 1 - i] = x;
        }
        free(base);
        break;
    }
    case K_EULER:
    case K_EULER_A:
    case K_DPM:
        if (s->kind == K_DPM ? spaced_timesteps(s, steps, &t, &n, err) < 0 : euler_timesteps(s, steps, &t, &n, err) < 0)
            goto fail;
        if (n < 1) {
            db_err_set(err, DB_EUSAGE, "no timesteps");
            goto fail;
        }
        if (sigma_schedule(s, t, n, err) < 0)
            goto fail;
        break;
    default: break;
    }
    s->ts = t;
    s->nsteps = (int)n;
    if (n < 1) {
        db_err_set(err, DB_EUSAGE, "scheduler '%s': %d steps give an empty schedule", s->name, steps);
        goto fail;
    }
    /* Euler's continuous timesteps are log sigmas, not table indices */
    if (!(s->kind == K_EULER && s->c.timestep_continuous && s->c.prediction_type == DB_PRED_V) &&
        check_range(s, err) < 0)
        goto fail;
    return 0;
fail:
    free(t);
    s->ts = NULL;
    free(s->sig);
    s->sig = NULL;
    s->nsteps = 0;
    return -1;
}

int db_sched_nsteps(const db_sched *s)
{
    return s->nsteps;
}

double db_sched_timestep(const db_sched *s, int i)
{
    return i >= 0 && i < s->nsteps ? s->ts[i] : NAN;
}

const float *db_sched_sigmas(const db_sched *s)
{
    return s->sig;
}

float db_sched_init_noise_sigma(const db_sched *s)
{
    return s->init_sigma;
}

int db_sched_needs_noise(const db_sched *s, int i)
{
    if (i < 0 || i >= s->nsteps)
        return 0;
    switch (s->kind) {
    case K_DDIM: return s->eta > 0;
    case K_EULER_A: return 1;
    case K_DDPM: return s->ts[i] > 0;
    default: return 0;
    }
}

int db_sched_has_pred_x0(const db_sched *s)
{
    return s->kind != K_PNDM;
}

void db_sched_scale_model_input(const db_sched *s, int i, float *out, const float *x, size_t n)
{
    if ((s->kind == K_EULER || s->kind == K_EULER_A) && s->sig && i >= 0 && i < s->nsteps) {
        /* sample / ((sigma**2 + 1) ** 0.5) */
        float sigma = s->sig[i];
        float d = sqrtf(sigma * sigma + 1.0f);
        for (size_t k = 0; k < n; k++)
            out[k] = x[k] / d;
    } else if (out != x) {
        memmove(out, x, n * sizeof *out);
    }
}

/* ---- steps --------------------------------------------------------------------- */

static float clampf(float v, float lo, float hi)
{
    return v < lo ? lo : v > hi ? hi : v; /* torch.clamp keeps NaN */
}

/* DDIMScheduler.step's scalars for call i (sched.h) */
int db_sched_ddim_coef(const db_sched *s, int i, db_ddim_coef *k)
{
    if (s->kind != K_DDIM || i < 0 || i >= s->nsteps)
        return -1;
    const int64_t t = (int64_t)s->ts[i];
    const int64_t prev = t - s->ntrain / s->ninfer; /* diffusers' rule for every spacing */
    const float a = s->acp[t], ap = prev >= 0 ? s->acp[prev] : s->final_acp;
    const float b = 1.0f - a;
    /* variance = (beta_prod_t_prev / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
     * std_dev_t = eta * variance ** 0.5 */
    const float bp = 1.0f - ap;
    const float var = (bp / b) * (1.0f - a / ap);
    const float std = (float)s->eta * sqrtf(var);
    memset(k, 0, sizeof *k);
    k->sa = sqrtf(a), k->sb = sqrtf(b);
    k->std = std;
    /* (1 - alpha_prod_t_prev - std_dev_t**2) ** 0.5 */
    k->dirc = sqrtf((1.0f - ap) - std * std);
    k->sap = sqrtf(ap);
    const db_pred pt = s->c.prediction_type;
    k->pred = pt == DB_PRED_EPSILON ? 0 : pt == DB_PRED_V ? 1 : 2;
    k->clip_on = s->c.clip_sample != 0;
    k->cr = (float)s->c.clip_sample_range;
    k->noise_on = s->eta > 0;
    return 0;
}

/* DDIMScheduler.step: the elements by kernels/ddim_step.h, which the
 * device's op (db_ddim_step_forward) shares */
static void step_ddim(db_sched *s, int i, const float *mo, float *x, size_t n, const float *noise, float *px0)
{
    db_ddim_coef k;
    db_sched_ddim_coef(s, i, &k);
    for (size_t e = 0; e < n; e++) {
        float x0;
        x[e] = db_ddim_elem(&k, x[e], mo[e], k.noise_on ? noise[e] : 0.0f, &x0);
        if (px0)
            px0[e] = x0;
    }
}

/* DDPMScheduler.step */
static void step_ddpm(db_sched *s, int i, const float *mo, float *x, size_t n, const float *noise, float *px0)
{
    const int64_t t = (int64_t)s->ts[i];
    const int64_t prev = t - s->ntrain / s->ninfer;
    const float a = s->acp[t], ap = prev >= 0 ? s->acp[prev] : 1.0f;
    const float b = 1.0f - a, bp = 1.0f - ap;
    const float ca = a / ap, cb = 1.0f - ca;
    const float sa = sqrtf(a), sb = sqrtf(b);
    const db_pred pt = s->c.prediction_type;
    const int clip = s->c.clip_sample;
    const float cr = (float)s->c.clip_sample_range;
    /* pred_original_sample_coeff = (alpha_prod_t_prev ** 0.5 * current_beta_t) / beta_prod_t
     * current_sample_coeff = current_alpha_t ** 0.5 * beta_prod_t_prev / beta_prod_t */
    const float c0 = (sqrtf(ap) * cb) / b;
    const float cs = (sqrtf(ca) * bp) / b;
    /* _get_variance: (1 - a_prev) / (1 - a) * current_beta_t, clamped at 1e-20 */
    float sd = 0.0f;
    if (t > 0) {
        float var = ((1.0f - ap) / (1.0f - a)) * cb;
        var = fmaxf(var, 1e-20f);
        if (s->c.variance_type == VT_FIXED_SMALL) {
            sd = sqrtf(var);
        } else if (s->c.variance_type == VT_FIXED_SMALL_LOG) {
            float lv = f_log(var);
            sd = f_exp(0.5f * lv);
        } else {
            sd = sqrtf(cb);
        }
    }
    for (size_t k = 0; k < n; k++) {
        float x0;
        if (pt == DB_PRED_EPSILON) {
            float tmp = sb * mo[k];
            x0 = (x[k] - tmp) / sa;
        } else if (pt == DB_PRED_SAMPLE) {
            x0 = mo[k];
        } else {
            float p = sa * x[k], q = sb * mo[k];
            x0 = p - q;
        }
        if (clip)
            x0 = clampf(x0, -cr, cr);
        float p = c0 * x0, q = cs * x[k];
        float y = p + q;
        if (t > 0) {
            float v = sd * noise[k];
            y = y + v;
        }
        if (px0)
            px0[k] = x0;
        x[k] = y;
    }
}

/* PNDMScheduler._get_prev_sample (formula (9) of the PNDM paper) */
static void pndm_prev_sample(const db_sched *s, const float *sample, int64_t t, int64_t prev, const float *mo,
                             float *out, size_t n)
{
    const float a = s->acp[t], ap = prev >= 0 ? s->acp[prev] : s->final_acp;
    const float b = 1.0f - a, bp = 1.0f - ap;
    const float sa = sqrtf(a), sb = sqrtf(b);
    /* sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
     * model_output_denom_coeff = alpha_prod_t * beta_prod_t_prev ** 0.5
     *                            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5 */
    const float sc = sqrtf(ap / a);
    const float den = a * sqrtf(bp) + sqrtf((a * b) * ap);
    const float dap = ap - a;
    const int v = s->c.prediction_type == DB_PRED_V;
    for (size_t k = 0; k < n; k++) {
        float m = mo[k];
        if (v) {
            float p = sa * m, q = sb * sample[k];
            m = p + q;
        }
        /* sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denom */
        float p = sc * sample[k];
        float q = (dap * m) / den;
        out[k] = p - q;
    }
}

/* PNDMScheduler.step_plms (skip_prk_steps) */
static int step_pndm(db_sched *s, int i, const float *mo, float *x, size_t n, db_err *err)
{
    const int64_t r = s->ntrain / s->ninfer;
    int64_t t = (int64_t)s->ts[i], prev = t - r;
    if (i != 1) {
        /* ets = ets[-3:] + [model_output]; ets[0] is the newest here */
        float *old = s->ets[3];
        s->ets[3] = s->ets[2];
        s->ets[2] = s->ets[1];
        s->ets[1] = s->ets[0];
        s->ets[0] = old;
        if (!s->ets[0] && !(s->ets[0] = malloc(n * sizeof(float))))
            return db_err_set(err, DB_ENOMEM, "out of memory");
        memcpy(s->ets[0], mo, n * sizeof(float));
        if (s->nets < 4)
            s->nets++;
    } else {
        prev = t;
        t = t + r;
    }
    float *m = malloc(n * sizeof *m);
    if (!m)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    const float *sample = x;
    const float *e1 = s->ets[0], *e2 = s->ets[1], *e3 = s->ets[2], *e4 = s->ets[3];
    if (s->nets == 1 && i == 0) {
        memcpy(m, mo, n * sizeof *m);
        if (!s->cur && !(s->cur = malloc(n * sizeof(float)))) {
            free(m);
            return db_err_set(err, DB_ENOMEM, "out of memory");
        }
        memcpy(s->cur, x, n * sizeof(float));
    } else if (s->nets == 1 && i == 1) {
        for (size_t k = 0; k < n; k++) /* (model_output + ets[-1]) / 2 */
            m[k] = (mo[k] + e1[k]) / 2.0f;
        sample = s->cur;
    } else if (s->nets == 2) {
        for (size_t k = 0; k < n; k++) { /* (3 * ets[-1] - ets[-2]) / 2 */
            float p = 3.0f * e1[k];
            m[k] = (p - e2[k]) / 2.0f;
        }
    } else if (s->nets == 3) {
        for (size_t k = 0; k < n; k++) { /* (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12 */
            float p = 23.0f * e1[k], q = 16.0f * e2[k], u = 5.0f * e3[k];
            float y = p - q;
            y = y + u;
            m[k] = y / 12.0f;
        }
    } else {
        const float c = (float)(1.0 / 24.0);
        for (size_t k = 0; k < n; k++) { /* (1/24) * (55 e1 - 59 e2 + 37 e3 - 9 e4) */
            float p = 55.0f * e1[k], q = 59.0f * e2[k], u = 37.0f * e3[k], w = 9.0f * e4[k];
            float y = p - q;
            y = y + u;
            y = y - w;
            m[k] = c * y;
        }
    }
    pndm_prev_sample(s, sample, t, prev, m, x, n);
    free(m);
    return 0;
}

/* EulerDiscreteScheduler.step with s_churn = 0 (gamma 0: sigma_hat = sigma) */
static void step_euler(db_sched *s, int i, const float *mo, float *x, size_t n, float *px0)
{
    const float sigma = s->sig[i];
    const float sh = sigma * 1.0f;
    const float dt = s->sig[i + 1] - sh;
    const db_pred pt = s->c.prediction_type;
    /* v: model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1)) */
    const float s2 = sigma * sigma + 1.0f;
    const float cv = -sigma / sqrtf(s2);
    for (size_t k = 0; k < n; k++) {
        float x0;
        if (pt == DB_PRED_EPSILON) {
            float tmp = sh * mo[k];
            x0 = x[k] - tmp;
        } else if (pt == DB_PRED_V) {
            float p = mo[k] * cv, q = x[k] / s2;
            x0 = p + q;
        } else {
            x0 = mo[k];
        }
        float d = (x[k] - x0) / sh;
        float u = d * dt;
        if (px0)
            px0[k] = x0;
        x[k] = x[k] + u;
    }
}

/* EulerAncestralDiscreteScheduler.step */
static void step_euler_a(db_sched *s, int i, const float *mo, float *x, size_t n, const float *noise, float *px0)
{
    const float sigma = s->sig[i], sf = sigma, st = s->sig[i + 1];
    /* sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
     * sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5 */
    const float st2 = st * st, sf2 = sf * sf;
    const float up = sqrtf((st2 * (sf2 - st2)) / sf2);
    const float down = sqrtf(st2 - up * up);
    const float dt = down - sigma;
    const int v = s->c.prediction_type == DB_PRED_V;
    const float s2 = sigma * sigma + 1.0f;
    const float cv = -sigma / sqrtf(s2);
    for (size_t k = 0; k < n; k++) {
        float x0;
        if (!v) {
            float tmp = sigma * mo[k];
            x0 = x[k] - tmp;
        } else {
            float p = mo[k] * cv, q = x[k] / s2;
            x0 = p + q;
        }
        float d = (x[k] - x0) / sigma;
        float u = d * dt;
        float y = x[k] + u;
        float w = noise[k] * up;
        if (px0)
            px0[k] = x0;
        x[k] = y + w;
    }
}

/* _sigma_to_alpha_sigma_t: alpha_t = 1 / (sigma**2 + 1) ** 0.5, sigma_t = sigma * alpha_t */
static void alpha_sigma(float sigma, float *alpha_t, float *sigma_t)
{
    float a = 1.0f / sqrtf(sigma * sigma + 1.0f);
    *alpha_t = a;
    *sigma_t = sigma * a;
}

/* DPMSolverMultistepScheduler.step, dpmsolver++, solver_order 2 */
static int step_dpm(db_sched *s, int i, const float *mo, float *x, size_t n, float *px0, db_err *err)
{
    const int last = s->nsteps;
    const int lower_final = i == last - 1 && (s->c.euler_at_final || (s->c.lower_order_final && last < 15) ||
                                              !s->c.final_sigma_min);
    /* (lower_order_second only matters for solver_order 3) */
    if (!s->cur && !(s->cur = malloc(n * sizeof(float))))
        return db_err_set(err, DB_ENOMEM, "out of memory");
    if (!s->prev && !(s->prev = malloc(n * sizeof(float))))
        return db_err_set(err, DB_ENOMEM, "out of memory");
    /* model_outputs shift: the previous x0 becomes model_outputs[-2] */
    float *tmp = s->prev;
    s->prev = s->cur;
    s->cur = tmp;

    /* convert_model_output: x0 prediction at sigmas[i] */
    float a0, s0;
    alpha_sigma(s->sig[i], &a0, &s0);
    float *x0 = s->cur;
    const db_pred pt = s->c.prediction_type;
    for (size_t k = 0; k < n; k++) {
        if (pt == DB_PRED_EPSILON) { /* (sample - sigma_t * model_output) / alpha_t */
            float q = s0 * mo[k];
            x0[k] = (x[k] - q) / a0;
        } else if (pt == DB_PRED_V) { /* alpha_t * sample - sigma_t * model_output */
            float p = a0 * x[k], q = s0 * mo[k];
            x0[k] = p - q;
        } else {
            x0[k] = mo[k];
        }
    }
    if (px0)
        memcpy(px0, x0, n * sizeof *px0);

    float at, sgt;
    alpha_sigma(s->sig[i + 1], &at, &sgt);
    const float lt = f_log(at) - f_log(sgt);
    const float l0 = f_log(a0) - f_log(s0);
    const float h = lt - l0;
    const float A = sgt / s0;                     /* sigma_t / sigma_s0 */
    const float B = at * (f_exp(-h) - 1.0f);      /* alpha_t * (exp(-h) - 1) */
    if (s->lower_order_nums < 1 || lower_final) {
        /* x_t = (sigma_t / sigma_s) * sample - (alpha_t * (exp(-h) - 1.0)) * model_output */
        for (size_t k = 0; k < n; k++) {
            float p = A * x[k], q = B * x0[k];
            x[k] = p - q;
        }
    } else {
        float a1, s1;
        alpha_sigma(s->sig[i - 1], &a1, &s1);
        const float l1 = f_log(a1) - f_log(s1);
        const float h0 = l0 - l1;
        const float r0 = h0 / h;
        const float rr = 1.0f / r0; /* D1 = (1.0 / r0) * (m0 - m1) */
        float C;
        if (!s->c.solver_heun)
            C = 0.5f * B; /* - 0.5 * (alpha_t * (exp(-h) - 1.0)) * D1 */
        else
            C = -(at * ((f_exp(-h) - 1.0f) / h + 1.0f)); /* + (alpha_t * ((exp(-h) - 1) / h + 1)) * D1 */
        const float *m1 = s->prev;
        for (size_t k = 0; k < n; k++) {
            float d = x0[k] - m1[k];
            float d1 = rr * d;
            float p = A * x[k], q = B * x0[k];
            float y = p - q;
            float u = C * d1;
            x[k] = y - u;
        }
    }
    if (s->lower_order_nums < 2)
        s->lower_order_nums++;
    return 0;
}

int db_sched_step(db_sched *s, int i, const float *model_out, float *x, size_t n, const float *noise, float *pred_x0,
                  db_err *err)
{
    if (!s->nsteps)
        return db_err_set(err, DB_EUSAGE, "scheduler '%s': step before set_timesteps", s->name);
    if (i < 0 || i >= s->nsteps)
        return db_err_set(err, DB_EUSAGE, "scheduler '%s': step %d outside [0, %d)", s->name, i, s->nsteps);
    const int stateful = s->kind == K_PNDM || s->kind == K_DPM;
    if (stateful && i != s->next)
        return db_err_set(err, DB_EUSAGE, "scheduler '%s': step %d out of order (expected %d)", s->name, i, s->next);
    if (stateful && i > 0 && n != s->n)
        return db_err_set(err, DB_EUSAGE, "scheduler '%s': step %d has %zu elements, earlier steps %zu", s->name, i,
                          n, s->n);
    if (db_sched_needs_noise(s, i) && !noise)
        return db_err_set(err, DB_EUSAGE, "scheduler '%s': step %d needs a noise array", s->name, i);
    if (i == 0 && stateful && n != s->n) {
        free_state(s);
        s->n = n;
    }
    int rc = 0;
    switch (s->kind) {
    case K_DDIM: step_ddim(s, i, model_out, x, n, noise, pred_x0); break;
    case K_DDPM: step_ddpm(s, i, model_out, x, n, noise, pred_x0); break;
    case K_PNDM: rc = step_pndm(s, i, model_out, x, n, err); break;
    case K_EULER: step_euler(s, i, model_out, x, n, pred_x0); break;
    case K_EULER_A: step_euler_a(s, i, model_out, x, n, noise, pred_x0); break;
    case K_DPM: rc = step_dpm(s, i, model_out, x, n, pred_x0, err); break;
    default: break;
    }
    if (rc < 0)
        return db_err_prefix(err, "scheduler '%s' step %d", s->name, i);
    s->next = i + 1;
    s->n = n;
    return 0;
}

/* ---- training ------------------------------------------------------------------ */

static int train_coeffs(const db_sched *s, int64_t t, float *sa, float *s1, db_err *err)
{
    if (t < 0 || t >= s->ntrain)
        return db_err_set(err, DB_EUSAGE, "timestep %lld outside [0, %d)", (long long)t, s->ntrain);
    *sa = sqrtf(s->acp[t]);
    *s1 = sqrtf(1.0f - s->acp[t]);
    return 0;
}

int db_sched_add_noise(const db_sched *s, float *out, const float *x0, const float *noise, size_t n, int64_t t,
                       db_err *err)
{
    float sa = 0, s1 = 0;
    if (train_coeffs(s, t, &sa, &s1, err) < 0)
        return -1;
    for (size_t k = 0; k < n; k++) {
        float p = sa * x0[k], q = s1 * noise[k];
        out[k] = p + q;
    }
    return 0;
}

int db_sched_velocity(const db_sched *s, float *out, const float *x0, const float *noise, size_t n, int64_t t,
                      db_err *err)
{
    float sa = 0, s1 = 0;
    if (train_coeffs(s, t, &sa, &s1, err) < 0)
        return -1;
    for (size_t k = 0; k < n; k++) {
        float p = sa * noise[k], q = s1 * x0[k];
        out[k] = p - q;
    }
    return 0;
}

/* ---- JSON with Python's non-finite literals --------------------------------------- */

int db_sched_config_parse(const char *text, size_t len, json_t **out, db_err *err)
{
    static const char *const lit[] = {"-Infinity", "Infinity", "NaN"};
    *out = NULL;
    char *buf = malloc(len * 2 + 1); /* each literal grows by 2 quotes at most */
    if (!buf)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    size_t o = 0;
    int in_str = 0;
    for (size_t i = 0; i < len;) {
        char ch = text[i];
        if (in_str) {
            buf[o++] = ch;
            i++;
            if (ch == '\\' && i < len)
                buf[o++] = text[i++];
            else if (ch == '"')
                in_str = 0;
            continue;
        }
        if (ch == '"') {
            in_str = 1;
            buf[o++] = ch;
            i++;
            continue;
        }
        size_t k = 0;
        for (; k < 3; k++) {
            size_t l = strlen(lit[k]);
            if (len - i >= l && !memcmp(text + i, lit[k], l)) {
                buf[o++] = '"';
                memcpy(buf + o, lit[k], l);
                o += l;
                buf[o++] = '"';
                i += l;
                break;
            }
        }
        if (k == 3)
            buf[o++] = text[i++];
    }
    json_error_t je;
    json_t *j = json_loadb(buf, o, JSON_REJECT_DUPLICATES, &je);
    free(buf);
    if (!j)
        return db_err_set(err, DB_EFORMAT, "line %d: %s", je.line, je.text);
    *out = j;
    return 0;
}

int db_sched_config_load(const char *path, json_t **out, db_err *err)
{
    *out = NULL;
    FILE *f = fopen(path, "rb");
    if (!f)
        return db_err_errno(err, path);
    char *text = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? cap * 2 : 4096;
            if (cap > (64u << 20)) {
                free(text);
                fclose(f);
                return db_err_set(err, DB_EFORMAT, "%s: larger than 64 MiB", path);
            }
            char *t = realloc(text, cap);
            if (!t) {
                free(text);
                fclose(f);
                return db_err_set(err, DB_ENOMEM, "out of memory");
            }
            text = t;
        }
        size_t got = fread(text + len, 1, cap - len, f);
        len += got;
        if (got == 0)
            break;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(text);
        errno = EIO;
        return db_err_errno(err, path);
    }
    int rc = db_sched_config_parse(text ? text : "", len, out, err);
    free(text);
    if (rc < 0)
        return db_err_prefix(err, "%s", path);
    return 0;
}
