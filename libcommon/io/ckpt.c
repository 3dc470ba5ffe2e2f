/* PyTorch zip checkpoints: see ckpt.h. */
#include "ckpt.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zip.h>

#include "pickle.h"

struct db_ckpt {
    db_tsrc src; /* first, so a db_tsrc * from an entry is the db_ckpt * */
    zip_t *za;
    char *path;
};

int db_ckpt_probe(const void *head, size_t n)
{
    return n >= 4 && !memcmp(head, "PK\3\4", 4);
}

void db_ckpt_close(db_ckpt *c)
{
    if (!c)
        return;
    if (c->za)
        zip_discard(c->za); /* read-only: nothing to write back */
    free(c->path);
    free(c);
}

static void src_close(db_tsrc *src) { db_ckpt_close((db_ckpt *)src); }

/* Element index one past the last element of the view (offset when empty). */
static int64_t view_end(const db_tentry *e)
{
    int64_t last = e->offset;
    for (int d = 0; d < e->ndim; d++) {
        if (e->shape[d] == 0)
            return e->offset;
        last += (e->shape[d] - 1) * e->strides[d]; /* checked for overflow by the unpickler */
    }
    return last + 1;
}

static int is_c_contiguous(const db_tentry *e)
{
    int64_t want = 1;
    for (int d = e->ndim - 1; d >= 0; d--) {
        if (e->shape[d] != 1 && e->strides[d] != want)
            return 0;
        want *= e->shape[d];
    }
    return 1;
}

/* Copy the strided view out of span (which starts at element e->offset)
 * into dst in C order, one innermost row at a time. */
static void gather(unsigned char *dst, const unsigned char *span, const db_tentry *e, size_t esz)
{
    int nd = e->ndim;
    int64_t idx[DB_MAXDIM] = {0};
    int64_t inner = e->shape[nd - 1], istride = e->strides[nd - 1];
    int64_t rows = db_shape_numel(nd - 1, e->shape);
    for (int64_t r = 0; r < rows; r++) {
        int64_t at = 0;
        for (int d = 0; d < nd - 1; d++)
            at += idx[d] * e->strides[d];
        for (int64_t i = 0; i < inner; i++, dst += esz)
            memcpy(dst, span + (size_t)(at + i * istride) * esz, esz);
        for (int d = nd - 2; d >= 0; d--) { /* odometer over the outer dims */
            if (++idx[d] < e->shape[d])
                break;
            idx[d] = 0;
        }
    }
}

/* Read exactly n bytes from a zip member. */
static int zread(zip_file_t *zf, void *dst, uint64_t n)
{
    unsigned char *p = dst;
    while (n) {
        zip_uint64_t want = n < (1u << 30) ? n : (1u << 30);
        zip_int64_t got = zip_fread(zf, p, want);
        if (got <= 0)
            return -1;
        p += got;
        n -= (uint64_t)got;
    }
    return 0;
}

/* Skip n bytes: seek in a stored member, read through a compressed one. */
static int zskip(zip_file_t *zf, uint64_t n)
{
    if (n == 0 || zip_fseek(zf, (zip_int64_t)n, SEEK_SET) == 0)
        return 0;
    unsigned char buf[1 << 14];
    while (n) {
        uint64_t k = n < sizeof buf ? n : sizeof buf;
        if (zread(zf, buf, k))
            return -1;
        n -= k;
    }
    return 0;
}

static int ckpt_read(db_tsrc *src, const db_tentry *e, void *dst, db_err *err)
{
    db_ckpt *c = (db_ckpt *)src;
    size_t esz = db_dtype_size(e->dtype);
    if (e->nbytes == 0)
        return 0;
    uint64_t lo = (uint64_t)e->offset * esz, hi = (uint64_t)view_end(e) * esz;
    zip_stat_t st;
    if (zip_stat_index(c->za, (zip_uint64_t)e->key, 0, &st) || !(st.valid & ZIP_STAT_SIZE) || hi > st.size)
        return db_err_set(err, DB_EFORMAT, "%s: tensor '%s': view outside its storage", c->path, e->name);
    int contiguous = is_c_contiguous(e);
    unsigned char *span = dst;
    if (!contiguous && !(span = malloc(hi - lo)))
        return db_err_set(err, DB_ENOMEM, "%s: tensor '%s': out of memory", c->path, e->name);
    zip_file_t *zf = zip_fopen_index(c->za, (zip_uint64_t)e->key, 0);
    int rc = -1;
    if (!zf) {
        db_err_set(err, DB_EIO, "%s: tensor '%s': opening %s: %s", c->path, e->name, st.name,
                   zip_strerror(c->za));
    } else if (zskip(zf, lo) || zread(zf, span, contiguous ? e->nbytes : hi - lo)) {
        db_err_set(err, DB_EIO, "%s: tensor '%s': reading %s: %s", c->path, e->name, st.name,
                   zip_file_strerror(zf));
    } else {
        if (!contiguous)
            gather(dst, span, e, esz);
        rc = 0;
    }
    if (zf)
        zip_fclose(zf);
    if (!contiguous)
        free(span);
    return rc;
}

/* State while the unpickler reports tensors. */
typedef struct add_ctx {
    db_ckpt *c;
    const char *top; /* "<top>/" */
    size_t ntop;
    db_tindex *ix;
    char *buf; /* scratch for member and tensor names */
    size_t cap;
} add_ctx;

static char *scratch(add_ctx *a, const char *s1, size_t n1, const char *s2, const char *s3)
{
    size_t n2 = strlen(s2), n3 = strlen(s3), n = n1 + n2 + n3 + 1;
    if (n > a->cap) {
        char *b = realloc(a->buf, n);
        if (!b)
            return NULL;
        a->buf = b;
        a->cap = n;
    }
    memcpy(a->buf, s1, n1);
    memcpy(a->buf + n1, s2, n2);
    memcpy(a->buf + n1 + n2, s3, n3 + 1);
    return a->buf;
}

static int add_tensor(void *ctx, const db_pickle_tensor *t, db_err *err)
{
    add_ctx *a = ctx;
    size_t esz = db_dtype_size(t->dtype);
    const char *member = scratch(a, a->top, a->ntop, "data/", t->storage);
    if (!member)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    zip_int64_t zi = zip_name_locate(a->c->za, member, ZIP_FL_ENC_RAW);
    if (zi < 0)
        return db_err_set(err, DB_EFORMAT, "tensor '%s': storage member %s is missing", t->name, member);
    zip_stat_t st;
    if (zip_stat_index(a->c->za, (zip_uint64_t)zi, 0, &st) || !(st.valid & ZIP_STAT_SIZE))
        return db_err_set(err, DB_EFORMAT, "tensor '%s': cannot stat %s", t->name, member);
    /* numel * esz cannot overflow: the unpickler bounds numel by INT64_MAX / esz */
    if (st.size != (uint64_t)t->storage_numel * esz)
        return db_err_set(err, DB_EFORMAT,
                          "tensor '%s': bad storage size: %s has %llu bytes, the pickle says %lld %s elements (%llu bytes)",
                          t->name, member, (unsigned long long)st.size, (long long)t->storage_numel,
                          db_dtype_name(t->dtype), (unsigned long long)t->storage_numel * esz);

    db_tentry e;
    memset(&e, 0, sizeof e);
    e.dtype = t->dtype;
    e.ndim = t->ndim;
    memcpy(e.shape, t->shape, sizeof e.shape);
    memcpy(e.strides, t->strides, sizeof e.strides);
    e.nbytes = (uint64_t)db_shape_nbytes(t->dtype, t->ndim, t->shape); /* >= 0: checked by the unpickler */
    e.comp = -1;
    e.src = &a->c->src;
    e.key = zi;
    e.offset = t->offset;
    e.name = t->name;
    return db_tindex_add(a->ix, &e, err);
}

/* Read a whole member (at most max bytes) into a fresh buffer. */
static int read_member(zip_t *za, zip_uint64_t i, uint64_t max, void **out, size_t *n, db_err *err)
{
    zip_stat_t st;
    *out = NULL;
    if (zip_stat_index(za, i, 0, &st) || !(st.valid & ZIP_STAT_SIZE))
        return db_err_set(err, DB_EFORMAT, "cannot stat member %llu", (unsigned long long)i);
    if (st.size > max)
        return db_err_set(err, DB_EUNSUPP, "%s is %llu bytes (at most %llu accepted)", st.name,
                          (unsigned long long)st.size, (unsigned long long)max);
    void *buf = malloc(st.size ? st.size : 1);
    if (!buf)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", st.name);
    zip_file_t *zf = zip_fopen_index(za, i, 0);
    if (!zf) {
        free(buf);
        return db_err_set(err, DB_EFORMAT, "opening %s: %s", st.name, zip_strerror(za));
    }
    if (zread(zf, buf, st.size)) {
        db_err_set(err, DB_EFORMAT, "reading %s: %s (truncated?)", st.name, zip_file_strerror(zf));
        zip_fclose(zf);
        free(buf);
        return -1;
    }
    zip_fclose(zf);
    *out = buf;
    *n = st.size;
    return 0;
}

/* Find "<top>/data.pkl" with a one-level top folder; *ntop gets the length
 * of "<top>/". */
static int find_data_pkl(zip_t *za, zip_uint64_t *index, const char **name, size_t *ntop, db_err *err)
{
    zip_int64_t ne = zip_get_num_entries(za, 0);
    int found = 0;
    for (zip_int64_t i = 0; i < ne; i++) {
        const char *nm = zip_get_name(za, (zip_uint64_t)i, ZIP_FL_ENC_RAW);
        const char *slash = nm ? strchr(nm, '/') : NULL;
        if (!slash || slash == nm || strcmp(slash + 1, "data.pkl"))
            continue;
        if (found++)
            return db_err_set(err, DB_EFORMAT, "several data.pkl members (%s and %s)", *name, nm);
        *index = (zip_uint64_t)i;
        *name = nm;
        *ntop = (size_t)(slash - nm) + 1;
    }
    if (!found)
        return db_err_set(err, DB_EFORMAT, "missing data.pkl: a zip, but not a torch.save archive");
    return 0;
}

/* Storages are raw machine bytes; we only read little-endian ones. */
static int check_byteorder(zip_t *za, const char *top, size_t ntop, db_err *err)
{
    char name[512];
    if (ntop + sizeof "byteorder" > sizeof name)
        return db_err_set(err, DB_EFORMAT, "archive folder name too long");
    memcpy(name, top, ntop);
    memcpy(name + ntop, "byteorder", sizeof "byteorder");
    zip_int64_t i = zip_name_locate(za, name, ZIP_FL_ENC_RAW);
    if (i < 0)
        return 0; /* written by torch < 1.11: always little-endian */
    void *buf = NULL;
    size_t n = 0;
    if (read_member(za, (zip_uint64_t)i, 64, &buf, &n, err))
        return -1;
    int rc = 0;
    if (n == 3 && !memcmp(buf, "big", 3))
        rc = db_err_set(err, DB_EUNSUPP, "big-endian checkpoint (byteorder 'big') is not supported");
    else if (!(n == 6 && !memcmp(buf, "little", 6)))
        rc = db_err_set(err, DB_EFORMAT, "byteorder is neither 'little' nor 'big'");
    free(buf);
    return rc;
}

static zip_t *open_zip(const char *path, db_err *err)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        db_err_errno(err, "open");
        return NULL;
    }
    struct stat sb;
    unsigned char head[16];
    ssize_t got = 0;
    if (fstat(fd, &sb) || !S_ISREG(sb.st_mode)) {
        db_err_set(err, DB_EIO, "not a regular file");
    } else if ((got = pread(fd, head, sizeof head, 0)) < 0) {
        db_err_errno(err, "read");
    } else if (!db_ckpt_probe(head, (size_t)got)) {
        /* torch < 1.6 wrote a pickled magic number, then more pickles */
        if (db_pickle_probe(head, (size_t)got))
            db_err_set(err, DB_EUNSUPP, "legacy torch.save format not supported, re-save with torch>=1.6");
        else
            db_err_set(err, DB_EFORMAT, "not a PyTorch checkpoint (no zip signature)");
    } else {
        int zerr = 0;
        zip_t *za = zip_fdopen(fd, ZIP_RDONLY | ZIP_CHECKCONS, &zerr);
        if (za)
            return za; /* owns fd now */
        zip_error_t ze;
        zip_error_init_with_code(&ze, zerr);
        db_err_set(err, DB_EFORMAT, "not a readable zip archive (truncated or corrupt?): %s", zip_error_strerror(&ze));
        zip_error_fini(&ze);
    }
    close(fd);
    return NULL;
}

int db_ckpt_open(db_ckpt **out, const char *path, db_tindex *ix, db_err *err)
{
    *out = NULL;
    db_ckpt *c = calloc(1, sizeof *c);
    if (!c || !(c->path = strdup(path))) {
        free(c);
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", path);
    }
    c->src.path = c->path;
    c->src.read = ckpt_read;
    c->src.close = src_close;
    size_t first = ix->n;
    void *pkl = NULL;
    size_t npkl = 0;
    zip_uint64_t pi = 0;
    const char *pname = NULL;
    add_ctx a = {.c = c, .ix = ix};
    int rc = -1;

    if (!(c->za = open_zip(path, err)))
        goto out;
    if (find_data_pkl(c->za, &pi, &pname, &a.ntop, err))
        goto out;
    a.top = pname;
    if (check_byteorder(c->za, a.top, a.ntop, err) || read_member(c->za, pi, DB_CKPT_MAX_PKL, &pkl, &npkl, err))
        goto out;
    if (db_pickle_tensors(pkl, npkl, add_tensor, &a, err)) {
        db_err_prefix(err, "%s", pname);
        goto out;
    }
    rc = 0;
out:
    free(pkl);
    free(a.buf);
    if (rc) {
        db_tindex_truncate(ix, first); /* all or nothing */
        db_ckpt_close(c);
        return db_err_prefix(err, "%s", path);
    }
    *out = c;
    return 0;
}
