#include "tensor.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

static const struct {
    const char *name, *st_name;
    size_t size;
    int is_float;
} dtypes[DB_NDTYPE] = {
    [DB_F32] = {"f32", "F32", 4, 1},  [DB_F16] = {"f16", "F16", 2, 1},
    [DB_BF16] = {"bf16", "BF16", 2, 1}, [DB_F64] = {"f64", "F64", 8, 1},
    [DB_I64] = {"i64", "I64", 8, 0},  [DB_I32] = {"i32", "I32", 4, 0},
    [DB_I16] = {"i16", "I16", 2, 0},  [DB_I8] = {"i8", "I8", 1, 0},
    [DB_U8] = {"u8", "U8", 1, 0},     [DB_BOOL] = {"bool", "BOOL", 1, 0},
};

size_t db_dtype_size(db_dtype t) { return (unsigned)t < DB_NDTYPE ? dtypes[t].size : 0; }
int db_dtype_is_float(db_dtype t) { return (unsigned)t < DB_NDTYPE && dtypes[t].is_float; }
const char *db_dtype_name(db_dtype t) { return (unsigned)t < DB_NDTYPE ? dtypes[t].name : "?"; }
const char *db_dtype_st_name(db_dtype t) { return (unsigned)t < DB_NDTYPE ? dtypes[t].st_name : "?"; }

int db_dtype_parse(const char *s)
{
    static const struct { const char *alias; db_dtype t; } aliases[] = {
        {"fp32", DB_F32}, {"float32", DB_F32}, {"float", DB_F32}, {"fp16", DB_F16},
        {"float16", DB_F16}, {"half", DB_F16}, {"bfloat16", DB_BF16}, {"fp64", DB_F64},
        {"float64", DB_F64}, {"double", DB_F64}, {"int64", DB_I64}, {"int32", DB_I32},
        {"int16", DB_I16}, {"int8", DB_I8}, {"uint8", DB_U8},
    };
    if (!s)
        return -1;
    for (int i = 0; i < DB_NDTYPE; i++)
        if (!strcasecmp(s, dtypes[i].name))
            return i;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (!strcasecmp(s, aliases[i].alias))
            return aliases[i].t;
    return -1;
}

int64_t db_shape_numel(int ndim, const int64_t *shape)
{
    if (ndim < 0 || ndim > DB_MAXDIM)
        return -1;
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return -1;
        if (shape[i] && n > INT64_MAX / shape[i])
            return -1;
        n *= shape[i];
    }
    return n;
}

int64_t db_shape_nbytes(db_dtype t, int ndim, const int64_t *shape)
{
    int64_t n = db_shape_numel(ndim, shape);
    int64_t sz = (int64_t)db_dtype_size(t);
    if (n < 0 || sz == 0 || (n && n > INT64_MAX / sz))
        return -1;
    return n * sz;
}

int db_shape_equal(int na, const int64_t *a, int nb, const int64_t *b)
{
    return na == nb && (na == 0 || !memcmp(a, b, (size_t)na * sizeof *a));
}

const char *db_shape_str(char *buf, size_t n, int ndim, const int64_t *shape)
{
    size_t o = 0;
    o += (size_t)snprintf(buf + o, n - o, "[");
    for (int i = 0; i < ndim && o < n; i++)
        o += (size_t)snprintf(buf + o, n - o, "%s%lld", i ? ", " : "", (long long)shape[i]);
    if (o < n)
        snprintf(buf + o, n - o, "]");
    return buf;
}

int64_t db_tensor_numel(const db_tensor *t) { return db_shape_numel(t->ndim, t->shape); }
size_t db_tensor_nbytes(const db_tensor *t)
{
    int64_t n = db_shape_nbytes(t->dtype, t->ndim, t->shape);
    return n < 0 ? 0 : (size_t)n;
}

int db_tensor_alloc(db_tensor *t, db_dtype dtype, int ndim, const int64_t *shape, db_err *err)
{
    memset(t, 0, sizeof *t);
    int64_t nb = db_shape_nbytes(dtype, ndim, shape);
    if (nb < 0)
        return db_err_set(err, DB_EUSAGE, "invalid tensor shape or dtype");
    t->dtype = dtype;
    t->ndim = ndim;
    if (ndim)
        memcpy(t->shape, shape, (size_t)ndim * sizeof *shape);
    t->data = calloc(1, nb ? (size_t)nb : 1);
    if (!t->data)
        return db_err_set(err, DB_ENOMEM, "out of memory allocating %lld bytes", (long long)nb);
    t->owned = 1;
    return 0;
}

void db_tensor_free(db_tensor *t)
{
    if (t && t->owned)
        free(t->data);
    if (t) {
        t->data = NULL;
        t->owned = 0;
    }
}

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}
static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

float db_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0x1f) /* inf / nan (keep payload, force quiet) */
        return bits_f32(sign | 0x7f800000u | (man << 13) | (man ? 0x400000u : 0));
    if (exp == 0) {
        if (!man)
            return bits_f32(sign);
        /* subnormal: man * 2^-24, exact in f32 */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    return bits_f32(sign | ((exp + 112) << 23) | (man << 13));
}

uint16_t db_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* nan: keep top payload bits, force quiet */
        return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff);
    if (a >= 0x477ff000u) /* >= 65520 rounds to inf */
        return sign | 0x7c00;
    if (a < 0x38800000u) { /* below the smallest normal 2^-14: subnormal or zero */
        if (a < 0x33000000u) /* < 2^-25: rounds to zero (2^-25 itself ties to even 0) */
            return sign;
        uint32_t man = (a & 0x7fffff) | 0x800000;
        int shift = 126 - (int)(a >> 23); /* 14..24 */
        uint32_t q = man >> shift, rem = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (q & 1)))
            q++;
        return sign | (uint16_t)q;
    }
    /* normal: rebias exponent and round mantissa from 23 to 10 bits */
    uint32_t r = a - 0x38000000u; /* exponent - 112 in place */
    uint32_t q = r >> 13, rem = r & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (q & 1)))
        q++; /* carries into the exponent correctly, up to inf */
    return sign | (uint16_t)q;
}

float db_bf16_to_f32(uint16_t b) { return bits_f32((uint32_t)b << 16); }

uint16_t db_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

/* Read element i of src as double (exact for every dtype but i64 beyond 2^53). */
static double load_d(const void *p, db_dtype t, size_t i)
{
    switch (t) {
    case DB_F32: return ((const float *)p)[i];
    case DB_F16: return db_f16_to_f32(((const uint16_t *)p)[i]);
    case DB_BF16: return db_bf16_to_f32(((const uint16_t *)p)[i]);
    case DB_F64: return ((const double *)p)[i];
    case DB_I64: return (double)((const int64_t *)p)[i];
    case DB_I32: return ((const int32_t *)p)[i];
    case DB_I16: return ((const int16_t *)p)[i];
    case DB_I8: return ((const int8_t *)p)[i];
    case DB_U8: return ((const uint8_t *)p)[i];
    case DB_BOOL: return ((const uint8_t *)p)[i] != 0;
    default: return 0;
    }
}

static int64_t sat_i(double v, double lo, double hi)
{
    if (isnan(v))
        return 0;
    if (v < lo)
        return (int64_t)lo;
    if (v > hi)
        return (int64_t)hi;
    return (int64_t)v;
}

/* double -> float with round-to-odd, so a following RNE to f16/bf16 rounds
 * exactly once (f32 has more than twice the mantissa bits of both). */
static float f32_round_odd(double v)
{
    float f = (float)v;
    if (isfinite(v) && isfinite(f) && (double)f != v && !(f32_bits(f) & 1)) {
        float other = (double)f > v ? nextafterf(f, -INFINITY) : nextafterf(f, INFINITY);
        if (f32_bits(other) & 1)
            f = other;
    }
    return f;
}

static void store_d(void *p, db_dtype t, size_t i, double v)
{
    switch (t) {
    case DB_F32: ((float *)p)[i] = (float)v; break; /* C rounds to nearest even */
    case DB_F16: ((uint16_t *)p)[i] = db_f32_to_f16(f32_round_odd(v)); break;
    case DB_BF16: ((uint16_t *)p)[i] = db_f32_to_bf16(f32_round_odd(v)); break;
    case DB_F64: ((double *)p)[i] = v; break;
    case DB_I64: ((int64_t *)p)[i] = sat_i(v, -9223372036854775808.0, 9223372036854774784.0); break;
    case DB_I32: ((int32_t *)p)[i] = (int32_t)sat_i(v, INT32_MIN, INT32_MAX); break;
    case DB_I16: ((int16_t *)p)[i] = (int16_t)sat_i(v, INT16_MIN, INT16_MAX); break;
    case DB_I8: ((int8_t *)p)[i] = (int8_t)sat_i(v, INT8_MIN, INT8_MAX); break;
    case DB_U8: ((uint8_t *)p)[i] = (uint8_t)sat_i(v, 0, 255); break;
    case DB_BOOL: ((uint8_t *)p)[i] = v != 0; break;
    default: break;
    }
}

int db_convert(void *dst, db_dtype dt, const void *src, db_dtype st, size_t n, db_err *err)
{
    if (!db_dtype_size(dt) || !db_dtype_size(st))
        return db_err_set(err, DB_EUSAGE, "convert: invalid dtype");
    if (dt == st) {
        if (dst != src)
            memmove(dst, src, n * db_dtype_size(dt));
        return 0;
    }
    /* Fast exact paths for the float conversions checkpoints need.
     * f16->bf16 and bf16->f16 go through f32 (exact), then one rounding. */
    if (st == DB_F32 && dt == DB_F16) {
        for (size_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = db_f32_to_f16(((const float *)src)[i]);
    } else if (st == DB_F32 && dt == DB_BF16) {
        for (size_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = db_f32_to_bf16(((const float *)src)[i]);
    } else if (st == DB_F16 && dt == DB_F32) {
        for (size_t i = 0; i < n; i++)
            ((float *)dst)[i] = db_f16_to_f32(((const uint16_t *)src)[i]);
    } else if (st == DB_BF16 && dt == DB_F32) {
        for (size_t i = 0; i < n; i++)
            ((float *)dst)[i] = db_bf16_to_f32(((const uint16_t *)src)[i]);
    } else {
        for (size_t i = 0; i < n; i++)
            store_d(dst, dt, i, load_d(src, st, i));
    }
    return 0;
}
