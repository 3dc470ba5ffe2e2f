/* Diffusion schedulers, computing what diffusers 0.27.2 computes.
 *
 * Names (db-sample --scheduler) and the diffusers class each one reproduces:
 *   "ddpm"             DDPMScheduler (ancestral; variance_type fixed_small,
 *                      fixed_small_log or fixed_large)
 *   "ddim"             DDIMScheduler (eta: db_sched_set_eta, default 0)
 *   "pndm"             PNDMScheduler with skip_prk_steps (PLMS, as SD uses)
 *   "euler"            EulerDiscreteScheduler (s_churn 0)
 *   "euler_a"          EulerAncestralDiscreteScheduler
 *   "dpmpp_2m"         DPMSolverMultistepScheduler, dpmsolver++, order 2
 *   "dpmpp_2m_karras"  the same with use_karras_sigmas forced on
 * The name fixes the class; the model's scheduler_config.json (any class's)
 * supplies the parameters, as diffusers' `Class.from_config(config)` does:
 * keys the class does not take are ignored, missing keys take that class's
 * defaults, and a value we do not implement is refused naming the key.
 * For the dpmpp names, algorithm_type and solver_order come from the name.
 *
 * Numerics: coefficient tables are built as diffusers builds them
 * (betas by torch.linspace in float32 with its vectorised FMA arithmetic,
 * alphas_cumprod by torch.cumprod with a double accumulator, timesteps with
 * numpy's linspace/arange/round-half-even, sigmas by np.interp in double then
 * float32), and each step performs the same float32 operations in the same
 * order as the diffusers code on 0-dim tensors, with torch's float log/exp
 * (SLEEF's) reproduced.  On the tiny-dev references every table, schedule and
 * step output is bit-identical to diffusers' (PyTorch 1.13 CPU, AVX2 kernels,
 * no MKL; the build must not contract a*b+c into FMAs, see sched.c).
 * Euler-type timesteps are fractional (float32 values, returned as double).
 *
 * Use (x is the latent batch, n floats, any number of images):
 *   db_sched_create(&s, "euler", cfg, &e); db_sched_set_timesteps(s, 30, &e);
 *   x = noise * db_sched_init_noise_sigma(s)
 *   for i in 0 .. db_sched_nsteps(s) - 1:
 *       db_sched_scale_model_input(s, i, xin, x, n)
 *       eps = model(xin, db_sched_timestep(s, i))      (the caller's job)
 *       db_sched_step(s, i, eps, x, n, noise_i_or_NULL, NULL, &e)
 * Ancestral steps (db_sched_needs_noise) take n standard-normal floats from
 * the caller (noise.h: draw i + 1 of each image's stream), so the scheduler
 * stays a pure function of its inputs and a CUDA twin can draw on device. */
#ifndef DB_SCHED_H
#define DB_SCHED_H

#include <jansson.h>
#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"

typedef struct db_sched db_sched;

typedef enum db_pred { DB_PRED_EPSILON = 0, DB_PRED_V, DB_PRED_SAMPLE } db_pred;

/* config: the parsed scheduler_config.json, or NULL for the class defaults
 * (which are not SD's: pass the model's config). */
int db_sched_create(db_sched **out, const char *name, const json_t *config, db_err *err);
void db_sched_free(db_sched *s);

/* The scheduler names, NULL-terminated (for --help and error messages). */
extern const char *const db_sched_names[];

const char *db_sched_name(const db_sched *s);
db_pred db_sched_prediction(const db_sched *s);
int db_sched_num_train_timesteps(const db_sched *s);
/* float32 tables of num_train_timesteps entries, valid until db_sched_free:
 * what training needs (noisy latents, v targets, min-SNR weights). */
const float *db_sched_betas(const db_sched *s);
const float *db_sched_alphas_cumprod(const db_sched *s);

/* DDIM's eta (0 deterministic, 1 DDPM-like); other schedulers ignore it, as
 * the diffusers pipeline passes eta only to schedulers that take it. */
int db_sched_set_eta(db_sched *s, double eta, db_err *err);

/* Build the inference schedule and reset the sampler state. */
int db_sched_set_timesteps(db_sched *s, int steps, db_err *err);
/* Model calls in the schedule (PNDM/PLMS: steps + 1); 0 before set_timesteps. */
int db_sched_nsteps(const db_sched *s);
/* Timestep to give the model at call i (integers, or float32 values for Euler). */
double db_sched_timestep(const db_sched *s, int i);
/* Euler/DPM sigma schedule (nsteps + 1 values, last the final sigma); NULL otherwise. */
const float *db_sched_sigmas(const db_sched *s);
/* Multiply the initial N(0, 1) latents by this. */
float db_sched_init_noise_sigma(const db_sched *s);
/* Does step i use a noise array? */
int db_sched_needs_noise(const db_sched *s, int i);
/* Does db_sched_step produce a predicted x0 (all but PNDM)? */
int db_sched_has_pred_x0(const db_sched *s);

/* out (n) = the model input for call i from sample x (n); out may be x. */
void db_sched_scale_model_input(const db_sched *s, int i, float *out, const float *x, size_t n);

/* One sampler step: x (n) is replaced by the sample after call i, given the
 * model output (n) at x.  noise (n standard normals) is required when
 * db_sched_needs_noise(s, i), ignored otherwise.  pred_x0 (n, may be NULL)
 * receives the predicted clean sample when db_sched_has_pred_x0.  PNDM and
 * DPM keep history: their steps must come in order 0, 1, ... with the same n. */
int db_sched_step(db_sched *s, int i, const float *model_out, float *x, size_t n, const float *noise, float *pred_x0,
                  db_err *err);

/* DDIM (only): call i's scalars for the device's step (kernels/ops.h
 * db_ddim_step_forward, which performs db_sched_step's float operations on
 * them, so the same bits).  0; -1 for another scheduler or no such call. */
struct db_ddim_coef;
int db_sched_ddim_coef(const db_sched *s, int i, struct db_ddim_coef *k);

/* Training (DDPMScheduler.add_noise / get_velocity, whatever the name), one
 * timestep t in [0, num_train_timesteps) for all n elements:
 *   noisy = sqrt(acp[t]) x0 + sqrt(1 - acp[t]) noise
 *   v     = sqrt(acp[t]) noise - sqrt(1 - acp[t]) x0 */
int db_sched_add_noise(const db_sched *s, float *out, const float *x0, const float *noise, size_t n, int64_t t,
                       db_err *err);
int db_sched_velocity(const db_sched *s, float *out, const float *x0, const float *noise, size_t n, int64_t t,
                      db_err *err);

/* Parse a JSON config as Python's json module writes it: bare NaN, Infinity
 * and -Infinity (diffusers saves lambda_min_clipped = -Infinity) are read as
 * the strings "NaN", "Infinity", "-Infinity", which the scheduler accepts
 * wherever it wants a number. */
int db_sched_config_parse(const char *text, size_t len, json_t **out, db_err *err);
int db_sched_config_load(const char *path, json_t **out, db_err *err);

#endif
