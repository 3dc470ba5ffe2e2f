/* Core: dtype conversions (exhaustive for f16/bf16), crc32c, arena, cli. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "libcommon/core/arena.h"
#include "libcommon/core/cli.h"
#include "libcommon/core/crc32c.h"
#include "libcommon/core/tensor.h"
#include "tap.h"

static uint32_t fbits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* Reference f32 -> f16 by exhaustive nearest search over the 65536 halves:
 * slow but obviously right; used on a sample of inputs. */
static uint16_t ref_f16(float f)
{
    if (isnan(f))
        return 0;
    double best = INFINITY;
    uint16_t bh = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float v = db_f16_to_f32((uint16_t)h);
        if (isnan(v) || signbit(v) != signbit(f))
            continue; /* rounding keeps the sign */
        double d = fabs((double)v - (double)f);
        if (isinf(v) && !isinf(f)) {
            /* inf is "nearest" once |f| >= 65520 (max + half ulp) */
            d = fabs((double)f) >= 65520.0 ? 0 : INFINITY;
        }
        if (d < best || (d == best && !(h & 1) && (bh & 1))) {
            best = d;
            bh = (uint16_t)h;
        }
    }
    return bh;
}

int main(void)
{
    /* f16 -> f32 -> f16 is the identity for every non-NaN half */
    int bad = 0;
    for (uint32_t h = 0; h < 0x10000; h++) {
        float f = db_f16_to_f32((uint16_t)h);
        if (isnan(f)) {
            bad += !isnan(db_f16_to_f32(db_f32_to_f16(f)));
            continue;
        }
        bad += db_f32_to_f16(f) != h;
    }
    tap_ok(bad == 0, "f16 round trip exact for all 65536 values (%d bad)", bad);

    bad = 0;
    for (uint32_t b = 0; b < 0x10000; b++) {
        float f = db_bf16_to_f32((uint16_t)b);
        if (isnan(f))
            continue;
        bad += db_f32_to_bf16(f) != b;
    }
    tap_ok(bad == 0, "bf16 round trip exact for all non-NaN values (%d bad)", bad);

    /* round-to-nearest-even at ties and against an exhaustive reference */
    tap_ok(db_f32_to_f16(1.0f + 0x1p-11f) == 0x3c00, "f16 tie 1+2^-11 rounds to even 1.0");
    tap_ok(db_f32_to_f16(1.0f + 3 * 0x1p-11f) == 0x3c02, "f16 tie 1+3*2^-11 rounds to even");
    tap_ok(db_f32_to_f16(65520.0f) == 0x7c00 && db_f32_to_f16(65519.0f) == 0x7bff, "f16 overflow threshold");
    tap_ok(db_f32_to_f16(0x1p-25f) == 0 && db_f32_to_f16(0x1.000002p-25f) == 1, "f16 smallest subnormal tie");
    tap_ok(db_f32_to_bf16(1.0f + 0x1p-8f) == 0x3f80 && db_f32_to_bf16(1.0f + 3 * 0x1p-8f) == 0x3f82,
           "bf16 ties to even");
    tap_ok(isnan(db_f16_to_f32(db_f32_to_f16(NAN))) && isnan(db_bf16_to_f32(db_f32_to_bf16(NAN))),
           "NaN stays NaN");
    uint32_t seed = 12345;
    bad = 0;
    for (int i = 0; i < 300; i++) {
        seed = seed * 1664525u + 1013904223u;
        uint32_t u = (seed & 0x8fffffffu) | 0x30000000u; /* exponents around the f16 range */
        float f;
        memcpy(&f, &u, 4);
        if (isnan(f))
            continue;
        if (db_f32_to_f16(f) != ref_f16(f)) {
            if (!bad)
                tap_diag("f32 %08x: got %04x want %04x", fbits(f), db_f32_to_f16(f), ref_f16(f));
            bad++;
        }
    }
    tap_ok(bad == 0, "f32->f16 matches exhaustive nearest-even search on 300 random values");

    /* f64 -> f16 rounds once: a value just above a tie must round up */
    double just_above = 1.0 + 0x1p-11 + 0x1p-40;
    uint16_t h;
    db_convert(&h, DB_F16, &just_above, DB_F64, 1, NULL);
    tap_ok(h == 0x3c01, "f64 just above a tie rounds up (single rounding), got %04x", h);
    int32_t big = 16777217 + 2 * 65536 * 0; /* 2^24+1 */
    uint16_t bb;
    db_convert(&bb, DB_BF16, &big, DB_I32, 1, NULL);
    tap_ok(db_bf16_to_f32(bb) == 16777216.0f, "i32 -> bf16");
    float fl[3] = {1.5f, -2.7f, 300.0f};
    uint8_t u8[3];
    db_convert(u8, DB_U8, fl, DB_F32, 3, NULL);
    tap_ok(u8[0] == 1 && u8[1] == 0 && u8[2] == 255, "float -> u8 truncates and saturates");

    int64_t shp[2] = {INT64_MAX / 2, 4};
    tap_ok(db_shape_numel(2, shp) == -1, "numel overflow detected");
    tap_ok(db_dtype_parse("fp16") == DB_F16 && db_dtype_parse("BF16") == DB_BF16 && db_dtype_parse("x") == -1,
           "dtype names parse");

    /* crc32c check value */
    tap_ok(db_crc32c(0, "123456789", 9) == 0xE3069283u, "crc32c check value");
    tap_ok(db_crc32c(db_crc32c(0, "1234", 4), "56789", 5) == 0xE3069283u, "crc32c incremental");

    db_arena a;
    db_arena_init(&a, 64);
    int okal = 1;
    for (int i = 0; i < 1000; i++) {
        char *p = db_arena_alloc(&a, (size_t)(i % 97) + 1);
        okal &= p && ((uintptr_t)p % 64) == 0;
        memset(p, 1, (size_t)(i % 97) + 1);
    }
    tap_ok(okal && !strcmp(db_arena_strdup(&a, "hello"), "hello"), "arena allocations aligned and usable");
    db_arena_free(&a);

    const char *s = NULL;
    int64_t n = 3;
    double x = 0;
    int fl1 = 0;
    db_opt opts[] = {
        {"name", 'n', DB_OPT_STR, "S", "a name", &s, NULL, 0},
        {"count", 0, DB_OPT_INT, "N", "count", &n, "3", 0},
        {"scale", 0, DB_OPT_FLOAT, "X", "scale", &x, NULL, 0},
        {"flag", 0, DB_OPT_FLAG, NULL, "a flag", &fl1, NULL, 0},
        {0},
    };
    db_cli cli = {"prog", "[options] FILE", NULL, opts, NULL};
    char *argv[] = {"prog", "a", "--count=7", "-nfoo", "--scale", "0.5", "b", "--flag", "--", "--x"};
    char *pos[10];
    int npos;
    db_err e = {0};
    int rc = db_cli_parse(&cli, 10, argv, pos, &npos, "v\n", &e);
    tap_ok(rc == 0 && n == 7 && s && !strcmp(s, "foo") && x == 0.5 && fl1 && npos == 3 &&
               !strcmp(pos[2], "--x") && db_cli_given(&cli, "count") && !db_cli_given(&cli, "nothing"),
           "cli parses mixed options and positionals");
    char *bad1[] = {"prog", "--count", "x7"};
    tap_ok(db_cli_parse(&cli, 3, bad1, pos, &npos, "", &e) == DB_CLI_USAGE && strstr(e.msg, "--count"),
           "cli rejects a non-integer: %s", e.msg);
    char *bad2[] = {"prog", "--nope"};
    tap_ok(db_cli_parse(&cli, 2, bad2, pos, &npos, "", &e) == DB_CLI_USAGE && strstr(e.msg, "--nope"),
           "cli rejects unknown options: %s", e.msg);
    return tap_done();
}
