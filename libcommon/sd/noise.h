/* Gaussian noise from a counter-based generator: the value at
 * (seed, stream, index) is a pure function of those three numbers, so it
 * does not depend on the device, the thread count, the batch size or how a
 * range is split into calls.
 *
 * The rule (a CUDA twin must implement exactly this):
 *
 *   block = index / 4, lane = index % 4
 *   key     = { seed & 0xffffffff, seed >> 32 }
 *   counter = { block & 0xffffffff, block >> 32, stream & 0xffffffff, stream >> 32 }
 *   r[0..3] = Philox4x32-10(counter, key)           (db_philox4x32, sd/init.h)
 *   u(w)    = (w + 0.5) * 2^-32                     (double, exact, in (0, 1))
 *   pair p = lane / 2 uses words a = r[2p], b = r[2p + 1]:
 *     rad   = sqrt(-2 * ln(u(a)))
 *     lane even: rad * cos(2 pi u(b))     lane odd: rad * sin(2 pi u(b))
 *   all in IEEE double, then rounded to float (nearest even).
 *
 * ln, cos and sin are not the C library's: noise.c evaluates them with fixed
 * polynomials made only of IEEE +, -, *, / and sqrt in a fixed order
 * (no fused multiply-add: build with -ffp-contract=off, which -std=c11
 * implies for GCC; nvcc needs -fmad=false or __dadd_rn/__dmul_rn), so the
 * double result, and hence the float, is identical on every IEEE machine.
 * The functions agree with libm to about 1e-16 relative; see test_noise.c.
 *
 * Sampling (db-sample, db-prior): image i of a run with seed S uses stream i,
 * where i counts images of the whole run (not of a batch), so image i of
 * "-n 4 --seed S" has the noise of "-n 1 --seed S" at image index i, and
 * "--seed S -n 1" is stream 0.  Within a stream, draw d covers elements
 * [d * N, (d + 1) * N), N being one image's latent element count: draw 0 is
 * the initial latents, draw k + 1 the ancestral noise of sampler step k
 * (db_noise_latents).  Other users (training) define their own streams. */
#ifndef DB_NOISE_H
#define DB_NOISE_H

#include <stddef.h>
#include <stdint.h>

/* Element `index` of stream `stream` under `seed`. */
float db_noise_at(uint64_t seed, uint64_t stream, uint64_t index);

/* out[k] = db_noise_at(seed, stream, offset + k) for k in [0, n). */
void db_noise_fill(float *out, size_t n, uint64_t seed, uint64_t stream, uint64_t offset);

/* The sampling rule above: out (N,) = draw `draw` of image `image`,
 * N = per_image elements. */
void db_noise_latents(float *out, size_t per_image, uint64_t seed, uint64_t image, uint64_t draw);

/* The elementary functions of the rule, exposed for tests:
 * ln(u) for u in (0, 1], and cos / sin of 2 pi v for v in [0, 1). */
double db_noise_log(double u);
void db_noise_sincos2pi(double v, double *s, double *c);

#endif
