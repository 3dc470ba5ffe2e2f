/* Noise: Philox known answers, golden values of the noise.h rule,
 * determinism, split invariance, moments, and the portable ln/sin/cos
 * against the C library. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/sd/init.h"
#include "libcommon/sd/noise.h"
#include "tap.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* The rule with libm's log/cos/sin (what a naive twin would compute). */
static float libm_value(uint64_t seed, uint64_t stream, uint64_t index)
{
    uint64_t b = index >> 2;
    const uint32_t key[2] = {(uint32_t)seed, (uint32_t)(seed >> 32)};
    const uint32_t ctr[4] = {(uint32_t)b, (uint32_t)(b >> 32), (uint32_t)stream, (uint32_t)(stream >> 32)};
    uint32_t r[4];
    db_philox4x32(ctr, key, r);
    unsigned lane = (unsigned)(index & 3), p = lane / 2;
    double u1 = ((double)r[2 * p] + 0.5) / 4294967296.0, u2 = ((double)r[2 * p + 1] + 0.5) / 4294967296.0;
    double rad = sqrt(-2.0 * log(u1)), th = 2.0 * M_PI * u2;
    return (float)(lane & 1 ? rad * sin(th) : rad * cos(th));
}

int main(void)
{
    /* Random123's kat_vectors for philox4x32_10 */
    {
        uint32_t out[4];
        const uint32_t c0[4] = {0, 0, 0, 0}, k0[2] = {0, 0};
        db_philox4x32(c0, k0, out);
        tap_ok(out[0] == 0x6627e8d5 && out[1] == 0xe169c58d && out[2] == 0xbc57ac4c && out[3] == 0x9b00dbd8,
               "philox4x32-10 kat: counter 0, key 0");
        const uint32_t c1[4] = {~0u, ~0u, ~0u, ~0u}, k1[2] = {~0u, ~0u};
        db_philox4x32(c1, k1, out);
        tap_ok(out[0] == 0x408f276d && out[1] == 0x41c83b0e && out[2] == 0xa20bc7c6 && out[3] == 0x6d5451fd,
               "philox4x32-10 kat: all ones");
    }

    /* Golden values, computed once with an independent pure-Python version
     * of the noise.h rule (Philox in Python integers, math.log/cos/sin in
     * double, struct.pack('f') to round): (seed, stream, index) -> float bits. */
    {
        static const struct {
            uint64_t seed, stream, index;
            uint32_t bits;
        } g[] = {
            {0, 0, 0, 1065204531u},  /* 0.991137683391571 */
            {0, 0, 1, 3211572912u},  /* -0.9246625900268555 */
            {0, 0, 2, 3206421407u},  /* -0.6176089644432068 */
            {0, 0, 3, 3203846578u},  /* -0.48206859827041626 */
            {42, 0, 0, 3212336732u}, /* -0.9701898097991943 */
            {42, 0, 5, 1041136143u}, /* 0.13913749158382416 */
            {42, 3, 7, 1063789962u}, /* 0.9068228006362915 */
            {1234567890123ull, 17, 1000003, 3210581878u},              /* -0.865592360496521 */
            {UINT64_MAX, UINT64_MAX, (1ull << 40) + 2, 1067969998u}, /* 1.3119447231292725 */
        };
        int bad = 0;
        for (size_t i = 0; i < sizeof g / sizeof g[0]; i++) {
            float v = db_noise_at(g[i].seed, g[i].stream, g[i].index);
            if (fbits(v) != g[i].bits) {
                tap_diag("seed %llu stream %llu index %llu: %.9g (0x%08x), want 0x%08x", (unsigned long long)g[i].seed,
                         (unsigned long long)g[i].stream, (unsigned long long)g[i].index, v, fbits(v), g[i].bits);
                bad++;
            }
        }
        tap_ok(bad == 0, "golden values of the rule (%d wrong)", bad);
    }

    /* determinism and split invariance */
    {
        enum { N = 1000 };
        float a[N], b[N], c[N];
        db_noise_fill(a, N, 7, 2, 0);
        db_noise_fill(b, N, 7, 2, 0);
        tap_ok(!memcmp(a, b, sizeof a), "same (seed, stream, range) gives the same bits");
        db_noise_fill(c, 300, 7, 2, 0);
        db_noise_fill(c + 300, N - 300, 7, 2, 300);
        tap_ok(!memcmp(a, c, sizeof a), "[0,1000) == [0,300) + [300,1000)");
        /* ragged splits that start and end inside Philox blocks */
        size_t at = 0, step = 1;
        while (at < N) {
            size_t k = at + step > N ? N - at : step;
            db_noise_fill(c + at, k, 7, 2, at);
            at += k;
            step = step * 3 % 11 + 1;
        }
        tap_ok(!memcmp(a, c, sizeof a), "ragged splits give the same bits");
        int same = 1;
        for (int i = 0; i < N; i++)
            same &= fbits(db_noise_at(7, 2, (uint64_t)i)) == fbits(a[i]);
        tap_ok(same, "db_noise_at agrees with db_noise_fill");
        db_noise_fill(b, N, 7, 3, 0);
        int diff = 0;
        for (int i = 0; i < N; i++)
            diff += a[i] != b[i];
        tap_ok(diff > N - 5, "another stream differs (%d of %d differ)", diff, N);
        db_noise_fill(b, N, 8, 2, 0);
        diff = 0;
        for (int i = 0; i < N; i++)
            diff += a[i] != b[i];
        tap_ok(diff > N - 5, "another seed differs (%d of %d differ)", diff, N);
        /* the sampling rule: image 2, draw 3 of N-element latents */
        db_noise_latents(b, 64, 7, 2, 3);
        db_noise_fill(c, 64, 7, 2, 3 * 64);
        tap_ok(!memcmp(b, c, 64 * sizeof(float)), "db_noise_latents: stream = image, offset = draw * N");
    }

    /* moments over 1e6 draws: sampling error of the mean is 1e-3, of the
     * variance 1.4e-3; bounds are about 5 standard errors */
    {
        const size_t n = 1000000;
        float *v = malloc(n * sizeof *v);
        db_noise_fill(v, n, 12345, 0, 0);
        double s1 = 0, s2 = 0, s4 = 0;
        size_t tail = 0;
        int finite = 1;
        for (size_t i = 0; i < n; i++) {
            double x = v[i];
            finite &= isfinite(x);
            s1 += x;
            s2 += x * x;
            s4 += x * x * x * x;
            tail += fabs(x) > 2.0;
        }
        double mean = s1 / n, var = s2 / n - mean * mean, kurt = s4 / n / (var * var);
        double ptail = (double)tail / n; /* P(|z| > 2) = 0.0455003 */
        tap_ok(finite, "all finite");
        tap_ok(fabs(mean) < 5e-3, "mean %.5f", mean);
        tap_ok(fabs(sqrt(var) - 1.0) < 4e-3, "std %.5f", sqrt(var));
        tap_ok(fabs(kurt - 3.0) < 0.03, "kurtosis %.4f", kurt);
        tap_ok(fabs(ptail - 0.0455003) < 1.1e-3, "P(|z| > 2) = %.5f", ptail);

        /* the portable functions against libm: the float values agree except
         * where the double lands within ~1e-16 of a float rounding boundary */
        size_t mism = 0;
        double worst = 0;
        for (size_t i = 0; i < n; i++) {
            float w = libm_value(12345, 0, i);
            if (fbits(w) != fbits(v[i])) {
                mism++;
                double d = fabs((double)w - v[i]) / fmax(fabs((double)w), 1e-30);
                worst = fmax(worst, d);
            }
        }
        tap_ok(mism <= 2 && worst <= 1.2e-7, "vs libm log/cos/sin: %zu of %zu floats differ (by <= 1 ulp: %.2g)",
               mism, n, worst);
        free(v);
    }

    /* the elementary functions themselves, on the grid the rule uses */
    {
        double elog = 0, esc = 0;
        uint32_t w = 0x12345678u;
        for (int i = 0; i < 200000; i++) {
            w = w * 1664525u + 1013904223u;
            uint32_t x = i < 4 ? (i < 2 ? (uint32_t)i : ~0u - (uint32_t)(i - 2)) : w;
            double u = ((double)x + 0.5) / 4294967296.0;
            double l = db_noise_log(u), lr = log(u);
            elog = fmax(elog, fabs(l - lr) / fabs(lr));
            double s, c;
            db_noise_sincos2pi(u, &s, &c);
            esc = fmax(esc, fmax(fabs(s - sin(2 * M_PI * u)), fabs(c - cos(2 * M_PI * u))));
        }
        tap_ok(elog < 5e-16, "db_noise_log relative error %.3g", elog);
        tap_ok(esc < 1e-15, "db_noise_sincos2pi absolute error %.3g (includes libm's 2 pi u rounding)", esc);
    }
    return tap_done();
}
