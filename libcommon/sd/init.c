/* PyTorch-like initialisation from a counter-based generator (see init.h).
 *
 * Stream layout: key = splitmix64(seed ^ splitmix64(fnv1a64(name))); the
 * Philox counter is (block, 0, 0) with block = element / 4, and the block's
 * four 32-bit outputs give elements 4*block .. 4*block+3 (uniforms directly,
 * normals by Box-Muller on pairs).  Element i therefore has one value,
 * whatever range it is computed in. */
#include "init.h"

#include "../io/model.h"

#include <math.h>
#include <string.h>

void db_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4])
{
    uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
    uint32_t k0 = key[0], k1 = key[1];
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1;
        c3 = (uint32_t)p0;
        c0 = n0;
        c2 = n2;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
    out[0] = c0, out[1] = c1, out[2] = c2, out[3] = c3;
}

static uint64_t splitmix64(uint64_t x)
{
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

static uint64_t fnv1a64(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* (0, 1): never 0, so log() in Box-Muller is finite */
static double unit(uint32_t x)
{
    return ((double)x + 0.5) * (1.0 / 4294967296.0);
}

/* The four values of one block. */
static void block_values(const db_tname *t, const uint32_t key[2], uint64_t block, double v[4])
{
    uint32_t ctr[4] = {(uint32_t)block, (uint32_t)(block >> 32), 0, 0}, r[4];
    switch (t->init) {
    case DB_INIT_LINEAR_W:
    case DB_INIT_LINEAR_B:
    case DB_INIT_CONV_W:
    case DB_INIT_CONV_B: {
        /* kaiming_uniform(a=sqrt(5)): gain sqrt(2/(1+5)), bound gain*sqrt(3/fan_in) = 1/sqrt(fan_in) */
        double bound = 1.0 / sqrt((double)(t->fan_in > 0 ? t->fan_in : 1));
        db_philox4x32(ctr, key, r);
        for (int k = 0; k < 4; k++)
            v[k] = bound * (2.0 * unit(r[k]) - 1.0);
        break;
    }
    case DB_INIT_EMBED:
    case DB_INIT_NORMAL: {
        double std = t->init_std > 0 ? t->init_std : 1.0; /* nn.Embedding's default N(0, 1) */
        db_philox4x32(ctr, key, r);
        for (int k = 0; k < 4; k += 2) {
            double rad = sqrt(-2.0 * log(unit(r[k]))), th = 2.0 * M_PI * unit(r[k + 1]);
            v[k] = std * rad * cos(th);
            v[k + 1] = std * rad * sin(th);
        }
        break;
    }
    case DB_INIT_ONE: v[0] = v[1] = v[2] = v[3] = 1.0; break;
    default: v[0] = v[1] = v[2] = v[3] = 0.0; break;
    }
}

int db_init_tensor_range(const db_tname *t, uint64_t seed, void *dst, db_dtype dtype, int64_t start, int64_t count,
                         db_err *err)
{
    int64_t numel = db_shape_numel(t->ndim, t->shape);
    size_t esize = db_dtype_size(dtype);
    if (!esize)
        return db_err_set(err, DB_EUSAGE, "tensor '%s': invalid dtype %d", t->compvis, (int)dtype);
    if (numel < 0 || start < 0 || count < 0 || start > numel || count > numel - start)
        return db_err_set(err, DB_EUSAGE, "tensor '%s': range [%lld, +%lld) outside its %lld elements", t->compvis,
                          (long long)start, (long long)count, (long long)numel);
    if (!db_dtype_is_float(dtype) && t->init != DB_INIT_POSITION_IDS && t->init != DB_INIT_ZERO &&
        t->init != DB_INIT_ONE)
        return db_err_set(err, DB_EUSAGE, "tensor '%s': cannot initialise as %s", t->compvis, db_dtype_name(dtype));

    uint64_t k = splitmix64(seed ^ splitmix64(fnv1a64(t->compvis)));
    const uint32_t key[2] = {(uint32_t)k, (uint32_t)(k >> 32)};
    /* values in double (exact for position ids), converted in chunks */
    enum { CHUNK = 1024 };
    double buf[CHUNK], v[4];
    uint64_t have = UINT64_MAX; /* block currently in v */
    char *out = dst;
    for (int64_t done = 0; done < count;) {
        int64_t m = count - done < CHUNK ? count - done : CHUNK;
        for (int64_t j = 0; j < m; j++) {
            int64_t i = start + done + j;
            if (t->init == DB_INIT_POSITION_IDS) {
                buf[j] = (double)(i % (t->shape[t->ndim - 1]));
                continue;
            }
            uint64_t b = (uint64_t)i / 4;
            if (b != have) {
                block_values(t, key, b, v);
                have = b;
            }
            buf[j] = v[i % 4];
        }
        if (db_convert(out, dtype, buf, DB_F64, (size_t)m, err))
            return db_err_prefix(err, "tensor '%s'", t->compvis);
        out += (size_t)m * esize;
        done += m;
    }
    return 0;
}

int db_init_tensor(const db_tname *t, uint64_t seed, void *dst, db_dtype dtype, db_err *err)
{
    int64_t numel = db_shape_numel(t->ndim, t->shape);
    if (numel < 0)
        return db_err_set(err, DB_EUSAGE, "tensor '%s': bad shape", t->compvis);
    return db_init_tensor_range(t, seed, dst, dtype, 0, numel, err);
}

/* --- a random model in memory ---------------------------------------------- */

typedef struct init_src {
    db_tsrc src; /* first: the index entries point here */
    db_tname *rows;
    uint64_t seed;
} init_src;

static int init_read(db_tsrc *s, const db_tentry *e, void *dst, db_err *err)
{
    init_src *is = (init_src *)s;
    return db_init_tensor(&is->rows[e->key], is->seed, dst, e->dtype, err);
}

static void init_close(db_tsrc *s)
{
    init_src *is = (init_src *)s;
    free(is->rows);
    free(is);
}

int db_model_init_random(db_model *m, const db_arch *a, uint64_t seed, db_dtype dtype, db_err *err)
{
    memset(m, 0, sizeof *m);
    db_tindex_init(&m->t);
    db_tindex_init(&m->raw);
    m->path = strdup("(random init)");
    m->arch = *a;
    m->arch.text.has_position_ids = 1;
    init_src *is = calloc(1, sizeof *is);
    size_t nrows = 0;
    if (!is || !m->path) {
        free(is);
        db_model_close(m);
        return db_err_set(err, DB_ENOMEM, "out of memory");
    }
    is->src = (db_tsrc){"(random init)", init_read, init_close};
    is->seed = seed;
    /* the model owns the source through its source list (closed by db_model_close) */
    m->src[0] = is;
    m->src_kind[0] = DB_MODEL_SRC_OWNED;
    m->nsrc = 1;
    if (db_arch_names(&m->arch, &is->rows, &nrows, err)) {
        db_model_close(m);
        return -1;
    }
    for (size_t r = 0; r < nrows; r++) {
        db_tentry t;
        memset(&t, 0, sizeof t);
        t.name = is->rows[r].compvis;
        t.comp = is->rows[r].comp;
        t.ndim = is->rows[r].ndim;
        memcpy(t.shape, is->rows[r].shape, sizeof is->rows[r].shape);
        t.dtype = is->rows[r].init == DB_INIT_POSITION_IDS ? DB_I64 : dtype;
        t.nbytes = (uint64_t)db_shape_nbytes(t.dtype, t.ndim, t.shape);
        t.src = &is->src;
        t.key = (int64_t)r;
        if (db_tindex_add(&m->t, &t, err)) {
            db_model_close(m);
            return -1;
        }
    }
    m->scheduler = db_default_scheduler_config();
    return 0;
}
