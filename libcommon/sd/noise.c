/* Counter-based Gaussian noise; the rule is in noise.h.
 *
 * Everything below uses only IEEE double +, -, *, / and sqrt, in the order
 * written, with no fused multiply-adds.  The polynomials are truncated Taylor
 * (atanh, sin, cos) series: accurate to about 1e-16 relative, far below the
 * float rounding that follows, and the same bits on any IEEE machine. */
#include "noise.h"

/* No fused multiply-adds: GCC's -std=c11 already turns contraction off;
 * clang needs the pragma (GCC warns on it). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <math.h>

#include "init.h"

#define NZ_TWO_M32 (1.0 / 4294967296.0)

/* ln 2 split so that e * LN2_HI is exact for |e| < 2^11 (fdlibm's split) */
#define NZ_LN2_HI 6.93147180369123816490e-01
#define NZ_LN2_LO 1.90821492927058770002e-10

double db_noise_log(double u)
{
    int e;
    double m = frexp(u, &e); /* u = m 2^e, m in [0.5, 1): exact */
    if (m < 0.70710678118654752440) {
        m *= 2.0;
        e -= 1;
    }
    /* m in [sqrt(1/2), sqrt(2)): ln m = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 ...)
     * with s = (m - 1) / (m + 1), |s| < 0.1716, s^2 < 0.0295; terms up to
     * s^25/25 leave a remainder below 1e-19 relative to s. */
    double s = (m - 1.0) / (m + 1.0), z = s * s;
    double p = 1.0 / 25.0;
    p = p * z + 1.0 / 23.0;
    p = p * z + 1.0 / 21.0;
    p = p * z + 1.0 / 19.0;
    p = p * z + 1.0 / 17.0;
    p = p * z + 1.0 / 15.0;
    p = p * z + 1.0 / 13.0;
    p = p * z + 1.0 / 11.0;
    p = p * z + 1.0 / 9.0;
    p = p * z + 1.0 / 7.0;
    p = p * z + 1.0 / 5.0;
    p = p * z + 1.0 / 3.0;
    double lnm = 2.0 * s + 2.0 * s * (z * p);
    double de = (double)e;
    return de * NZ_LN2_HI + (de * NZ_LN2_LO + lnm);
}

void db_noise_sincos2pi(double v, double *s, double *c)
{
    /* quarter turns: t = 4v = q + r with integer q and r in [-1/2, 1/2];
     * v is (w + 0.5) 2^-32 in the rule, so t, t + 0.5 and r are exact */
    double t = 4.0 * v;
    double qd = floor(t + 0.5);
    double r = t - qd;
    int q = (int)qd & 3;
    double a = r * 1.57079632679489661923; /* |a| <= pi/4 */
    double z = a * a;
    /* Taylor to a^17 / a^18 (remainder < 1e-18 for |a| <= pi/4), signs folded
     * into the Horner coefficients:
     *   sin a = a - a z (1/3! - z/5! + ...),  cos a = 1 + z (-1/2! + z/4! - ...)
     * n! for n <= 18 is exact in a double, so each 1/n! is correctly rounded. */
    double ps = -1.0 / 355687428096000.0;          /* -1/17! */
    ps = ps * z + 1.0 / 1307674368000.0;           /* 1/15! */
    ps = ps * z - 1.0 / 6227020800.0;              /* 1/13! */
    ps = ps * z + 1.0 / 39916800.0;                /* 1/11! */
    ps = ps * z - 1.0 / 362880.0;                  /* 1/9! */
    ps = ps * z + 1.0 / 5040.0;                    /* 1/7! */
    ps = ps * z - 1.0 / 120.0;                     /* 1/5! */
    ps = ps * z + 1.0 / 6.0;                       /* 1/3! */
    double sn = a - a * (z * ps);
    double pc = -1.0 / 6402373705728000.0;         /* -1/18! */
    pc = pc * z + 1.0 / 20922789888000.0;          /* 1/16! */
    pc = pc * z - 1.0 / 87178291200.0;             /* 1/14! */
    pc = pc * z + 1.0 / 479001600.0;               /* 1/12! */
    pc = pc * z - 1.0 / 3628800.0;                 /* 1/10! */
    pc = pc * z + 1.0 / 40320.0;                   /* 1/8! */
    pc = pc * z - 1.0 / 720.0;                     /* 1/6! */
    pc = pc * z + 1.0 / 24.0;                      /* 1/4! */
    pc = pc * z - 1.0 / 2.0;                       /* 1/2! */
    double cs = 1.0 + z * pc;
    switch (q) {
    case 0: *s = sn, *c = cs; break;
    case 1: *s = cs, *c = -sn; break;
    case 2: *s = -sn, *c = -cs; break;
    default: *s = -cs, *c = sn; break;
    }
}

/* The four values of one Philox block. */
static void block4(uint64_t seed, uint64_t stream, uint64_t block, float out[4])
{
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), (uint32_t)stream, (uint32_t)(stream >> 32)};
    uint32_t r[4];
    db_philox4x32(ctr, key, r);
    for (int p = 0; p < 2; p++) {
        double u1 = ((double)r[2 * p] + 0.5) * NZ_TWO_M32;
        double u2 = ((double)r[2 * p + 1] + 0.5) * NZ_TWO_M32;
        double rad = sqrt(-2.0 * db_noise_log(u1));
        double sn, cs;
        db_noise_sincos2pi(u2, &sn, &cs);
        out[2 * p] = (float)(rad * cs);
        out[2 * p + 1] = (float)(rad * sn);
    }
}

float db_noise_at(uint64_t seed, uint64_t stream, uint64_t index)
{
    float v[4];
    block4(seed, stream, index >> 2, v);
    return v[index & 3];
}

void db_noise_fill(float *out, size_t n, uint64_t seed, uint64_t stream, uint64_t offset)
{
    size_t k = 0;
    float v[4];
    /* a partial first block, whole blocks, a partial last block */
    while (k < n) {
        uint64_t idx = offset + k;
        block4(seed, stream, idx >> 2, v);
        for (unsigned lane = (unsigned)(idx & 3); lane < 4 && k < n; lane++)
            out[k++] = v[lane];
    }
}

void db_noise_latents(float *out, size_t per_image, uint64_t seed, uint64_t image, uint64_t draw)
{
    db_noise_fill(out, per_image, seed, image, draw * (uint64_t)per_image);
}
