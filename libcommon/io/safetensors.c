#include "safetensors.h"

#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../core/fsutil.h"

static uint64_t rd_le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

int db_safetensors_probe(const void *head, size_t n, uint64_t file_size)
{
    const unsigned char *p = head;
    if (n < 9)
        return 0;
    /* the JSON header starts right after the length; a lying length is left
     * for db_safetensors_parse to report precisely */
    (void)file_size;
    return p[8] == '{';
}

typedef struct span {
    uint64_t begin, end;
    size_t entry;
} span;

static int cmp_span(const void *a, const void *b)
{
    const span *x = a, *y = b;
    if (x->begin != y->begin)
        return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

/* A JSON integer >= 0 that fits, or -1. */
static int64_t json_uint(const json_t *v)
{
    if (!json_is_integer(v))
        return -1;
    json_int_t i = json_integer_value(v);
    return i < 0 ? -1 : (int64_t)i;
}

int db_safetensors_parse(const void *buf, size_t n, uint64_t file_size, const unsigned char *data_base,
                         const char *prefix, int comp, db_tindex *ix, json_t **metadata, db_err *err)
{
    const unsigned char *p = buf;
    if (metadata)
        *metadata = NULL;
    if (n < 8 || file_size < 8)
        return db_err_set(err, DB_EFORMAT, "truncated: %llu bytes, shorter than the 8-byte header length",
                          (unsigned long long)file_size);
    uint64_t hl = rd_le64(p);
    if (hl > DB_ST_MAX_HEADER)
        return db_err_set(err, DB_EFORMAT, "header length %llu exceeds the %u-byte limit", (unsigned long long)hl,
                          DB_ST_MAX_HEADER);
    if (hl > file_size - 8 || hl > n - 8)
        return db_err_set(err, DB_EFORMAT, "header length %llu runs past the end of the file (%llu bytes)",
                          (unsigned long long)hl, (unsigned long long)file_size);
    uint64_t data_size = file_size - 8 - hl;
    json_error_t je;
    json_t *root = json_loadb((const char *)p + 8, (size_t)hl, JSON_REJECT_DUPLICATES, &je);
    if (!root)
        return db_err_set(err, DB_EFORMAT, "header is not valid JSON: %s (at byte %d)", je.text, je.position);
    if (!json_is_object(root)) {
        json_decref(root);
        return db_err_set(err, DB_EFORMAT, "header is not a JSON object");
    }
    size_t nt = json_object_size(root);
    span *spans = malloc((nt ? nt : 1) * sizeof *spans);
    size_t ns = 0, first = ix->n;
    int rc = -1;
    if (!spans) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    const char *key;
    json_t *val;
    json_object_foreach(root, key, val) {
        if (!strcmp(key, "__metadata__")) {
            if (!json_is_object(val)) {
                db_err_set(err, DB_EFORMAT, "__metadata__ is not an object");
                goto out;
            }
            const char *mk;
            json_t *mv;
            json_object_foreach(val, mk, mv) {
                if (!json_is_string(mv)) {
                    db_err_set(err, DB_EFORMAT, "__metadata__ value '%s' is not a string", mk);
                    goto out;
                }
            }
            if (metadata)
                *metadata = json_incref(val);
            continue;
        }
        if (strlen(key) > 1024 || !key[0]) {
            db_err_set(err, DB_EFORMAT, "tensor name of %zu bytes is not allowed", strlen(key));
            goto out;
        }
        json_t *jd = json_object_get(val, "dtype"), *js = json_object_get(val, "shape"),
               *jo = json_object_get(val, "data_offsets");
        if (!json_is_object(val) || !json_is_string(jd) || !json_is_array(js) || !json_is_array(jo) ||
            json_array_size(jo) != 2) {
            db_err_set(err, DB_EFORMAT, "tensor '%s': entry needs dtype, shape and data_offsets [begin, end]", key);
            goto out;
        }
        db_tentry e;
        memset(&e, 0, sizeof e);
        int dt = -1;
        for (int t = 0; t < DB_NDTYPE; t++)
            if (!strcmp(json_string_value(jd), db_dtype_st_name((db_dtype)t)))
                dt = t;
        if (dt < 0) {
            db_err_set(err, DB_EUNSUPP, "tensor '%s': unsupported dtype '%s'", key, json_string_value(jd));
            goto out;
        }
        e.dtype = (db_dtype)dt;
        if (json_array_size(js) > DB_MAXDIM) {
            db_err_set(err, DB_EUNSUPP, "tensor '%s': %zu dimensions (at most %d)", key, json_array_size(js),
                       DB_MAXDIM);
            goto out;
        }
        e.ndim = (int)json_array_size(js);
        for (int d = 0; d < e.ndim; d++) {
            e.shape[d] = json_uint(json_array_get(js, (size_t)d));
            if (e.shape[d] < 0) {
                db_err_set(err, DB_EFORMAT, "tensor '%s': shape entry %d is not a non-negative integer", key, d);
                goto out;
            }
        }
        int64_t b = json_uint(json_array_get(jo, 0)), en = json_uint(json_array_get(jo, 1));
        int64_t need = db_shape_nbytes(e.dtype, e.ndim, e.shape);
        if (b < 0 || en < 0 || b > en) {
            db_err_set(err, DB_EFORMAT, "tensor '%s': bad data_offsets", key);
            goto out;
        }
        if ((uint64_t)en > data_size) {
            db_err_set(err, DB_EFORMAT, "tensor '%s': data_offsets end %lld is past the data section (%llu bytes)",
                       key, (long long)en, (unsigned long long)data_size);
            goto out;
        }
        if (need < 0 || need != en - b) {
            char sb[128];
            db_err_set(err, DB_EFORMAT, "tensor '%s': shape %s of %s needs %lld bytes but data_offsets give %lld",
                       key, db_shape_str(sb, sizeof sb, e.ndim, e.shape), db_dtype_st_name(e.dtype),
                       (long long)need, (long long)(en - b));
            goto out;
        }
        e.nbytes = (uint64_t)need;
        e.comp = comp;
        e.ptr = data_base ? data_base + b : NULL;
        char namebuf[1200];
        snprintf(namebuf, sizeof namebuf, "%s%s", prefix ? prefix : "", key);
        e.name = namebuf;
        if (db_tindex_add(ix, &e, err))
            goto out;
        spans[ns].begin = (uint64_t)b;
        spans[ns].end = (uint64_t)en;
        spans[ns].entry = ix->n - 1;
        ns++;
    }
    /* tensors must tile the data section: sorted, each begins where the last ended */
    qsort(spans, ns, sizeof *spans, cmp_span);
    uint64_t at = 0;
    for (size_t i = 0; i < ns; i++) {
        if (spans[i].begin != at) {
            db_err_set(err, DB_EFORMAT, "tensor '%s': data_offsets %s at byte %llu (expected %llu)",
                       ix->v[spans[i].entry].name, spans[i].begin < at ? "overlap another tensor" : "leave a gap",
                       (unsigned long long)spans[i].begin, (unsigned long long)at);
            goto out;
        }
        at = spans[i].end;
    }
    if (at != data_size) {
        db_err_set(err, DB_EFORMAT, "data section has %llu bytes but the tensors cover %llu",
                   (unsigned long long)data_size, (unsigned long long)at);
        goto out;
    }
    rc = 0;
out:
    if (rc) {
        db_tindex_truncate(ix, first); /* drop the entries we added */
        if (metadata && *metadata) {
            json_decref(*metadata);
            *metadata = NULL;
        }
    }
    free(spans);
    json_decref(root);
    return rc;
}

int db_safetensors_open(db_safetensors **out, const char *path, const char *prefix, int comp, db_tindex *ix,
                        db_err *err)
{
    *out = NULL;
    int fd = open(path, O_RDONLY);
    if (fd < 0)
        return db_err_errno(err, path);
    struct stat st;
    if (fstat(fd, &st)) {
        close(fd);
        return db_err_errno(err, path);
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return db_err_set(err, DB_EFORMAT, "%s: not a regular file", path);
    }
    db_safetensors *s = calloc(1, sizeof *s);
    if (!s) {
        close(fd);
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", path);
    }
    s->path = strdup(path);
    s->size = (size_t)st.st_size;
    s->src.path = s->path;
    if (s->size) {
        s->map = mmap(NULL, s->size, PROT_READ, MAP_PRIVATE, fd, 0);
        if (s->map == MAP_FAILED) {
            s->map = NULL;
            close(fd);
            db_safetensors_close(s);
            return db_err_errno(err, path);
        }
    }
    close(fd);
    const unsigned char *base = s->map;
    uint64_t hl = s->size >= 8 ? rd_le64(base) : 0;
    if (db_safetensors_parse(base, s->size, s->size, base && hl <= s->size - 8 ? base + 8 + hl : NULL, prefix, comp,
                             ix, &s->metadata, err)) {
        db_safetensors_close(s);
        return db_err_prefix(err, "%s", path);
    }
    *out = s;
    return 0;
}

void db_safetensors_close(db_safetensors *st)
{
    if (!st)
        return;
    if (st->map)
        munmap(st->map, st->size);
    json_decref(st->metadata);
    free(st->path);
    free(st);
}

typedef struct order {
    const db_st_item *it;
    size_t i;
} order;

static int cmp_order(const void *a, const void *b)
{
    const order *x = a, *y = b;
    size_t sx = db_dtype_size(x->it->dtype), sy = db_dtype_size(y->it->dtype);
    if (sx != sy)
        return sx > sy ? -1 : 1;
    return strcmp(x->it->name, y->it->name);
}

int db_safetensors_write(const char *path, const db_st_item *items, size_t n, const char *const *meta_kv,
                         db_st_fill_fn fill, void *ctx, db_err *err)
{
    order *ord = malloc((n ? n : 1) * sizeof *ord);
    json_t *hdr = json_object();
    char *hjson = NULL;
    void *buf = NULL;
    size_t bufcap = 0;
    db_outfile of = {0};
    int rc = -1;
    if (!ord || !hdr) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    for (size_t i = 0; i < n; i++)
        ord[i] = (order){&items[i], i};
    qsort(ord, n, sizeof *ord, cmp_order);
    if (meta_kv && meta_kv[0]) {
        json_t *m = json_object();
        for (size_t k = 0; meta_kv[k] && meta_kv[k + 1]; k += 2)
            json_object_set_new(m, meta_kv[k], json_string(meta_kv[k + 1]));
        json_object_set_new(hdr, "__metadata__", m);
    }
    uint64_t off = 0;
    for (size_t k = 0; k < n; k++) {
        const db_st_item *it = ord[k].it;
        int64_t nb = db_shape_nbytes(it->dtype, it->ndim, it->shape);
        if (nb < 0 || !it->name[0] || !strcmp(it->name, "__metadata__")) {
            db_err_set(err, DB_EUSAGE, "tensor '%s': invalid name, shape or dtype", it->name);
            goto out;
        }
        json_t *shape = json_array();
        for (int d = 0; d < it->ndim; d++)
            json_array_append_new(shape, json_integer(it->shape[d]));
        json_t *e = json_pack("{s:s, s:o, s:[I,I]}", "dtype", db_dtype_st_name(it->dtype), "shape", shape,
                              "data_offsets", (json_int_t)off, (json_int_t)(off + (uint64_t)nb));
        if (!e || json_object_get(hdr, it->name) || json_object_set_new(hdr, it->name, e)) {
            db_err_set(err, DB_EUSAGE, "tensor '%s': duplicate name", it->name);
            goto out;
        }
        off += (uint64_t)nb;
    }
    hjson = json_dumps(hdr, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!hjson) {
        db_err_set(err, DB_ENOMEM, "out of memory");
        goto out;
    }
    size_t hl = strlen(hjson), padded = (hl + 7) & ~(size_t)7;
    if (db_outfile_open(&of, path, err))
        goto out;
    unsigned char lenb[8];
    for (int i = 0; i < 8; i++)
        lenb[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    int bad = fwrite(lenb, 1, 8, of.f) != 8 || fwrite(hjson, 1, hl, of.f) != hl;
    for (size_t i = hl; i < padded && !bad; i++)
        bad = fputc(' ', of.f) == EOF;
    for (size_t k = 0; k < n && !bad; k++) {
        const db_st_item *it = ord[k].it;
        size_t nb = (size_t)db_shape_nbytes(it->dtype, it->ndim, it->shape);
        if (nb > bufcap) {
            free(buf);
            buf = malloc(nb);
            bufcap = buf ? nb : 0;
            if (!buf) {
                db_err_set(err, DB_ENOMEM, "tensor '%s': out of memory", it->name);
                goto out;
            }
        }
        if (fill(ctx, ord[k].i, buf, err)) {
            db_err_prefix(err, "%s", path);
            goto out;
        }
        bad = nb && fwrite(buf, 1, nb, of.f) != nb;
    }
    if (bad) {
        db_err_errno(err, path);
        goto out;
    }
    rc = db_outfile_commit(&of, err);
out:
    if (rc)
        db_outfile_abort(&of);
    free(buf);
    free(hjson);
    free(ord);
    json_decref(hdr);
    return rc;
}
