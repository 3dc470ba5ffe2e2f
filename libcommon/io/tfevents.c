/* TensorBoard event files: TFRecord framing around protobuf-c encoded Events
 * (see tfevents.h and proto/tfevents.proto). */
#include "tfevents.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../core/crc32c.h"
#include "../core/fsutil.h"
#include "proto/tfevents.pb-c.h" /* generated into build/gen by protoc-c */

/* The first read of a record's data is at most this; the buffer then grows
 * only as bytes actually arrive, so a lying length cannot make us allocate
 * more than the input holds (plus this). */
#define READ_CHUNK ((size_t)1 << 20)

struct db_tfevents {
    FILE *f;
    char *path;
    uint8_t *buf; /* packed Event, reused */
    size_t cap;
};

uint32_t db_tfrecord_crc(const void *buf, size_t n)
{
    uint32_t c = db_crc32c(0, buf, n);
    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t get_le64(const uint8_t *p)
{
    return (uint64_t)get_le32(p) | (uint64_t)get_le32(p + 4) << 32;
}

double db_tfevents_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* One TFRecord holding ev. */
static int write_event(db_tfevents *w, const Tensorboard__Event *ev, db_err *err)
{
    size_t n = tensorboard__event__get_packed_size(ev);
    if (n > w->cap) {
        uint8_t *b = realloc(w->buf, n);
        if (!b)
            return db_err_set(err, DB_ENOMEM, "%s: event of %zu bytes: out of memory", w->path, n);
        w->buf = b;
        w->cap = n;
    }
    tensorboard__event__pack(ev, w->buf);
    uint8_t head[12], tail[4];
    put_le64(head, n);
    put_le32(head + 8, db_tfrecord_crc(head, 8));
    put_le32(tail, db_tfrecord_crc(w->buf, n));
    if (fwrite(head, 1, sizeof head, w->f) != sizeof head || fwrite(w->buf, 1, n, w->f) != n ||
        fwrite(tail, 1, sizeof tail, w->f) != sizeof tail)
        return db_err_errno(err, w->path);
    return 0;
}

int db_tfevents_flush(db_tfevents *w, db_err *err)
{
    if (fflush(w->f) || fsync(fileno(w->f)))
        return db_err_errno(err, w->path);
    return 0;
}

const char *db_tfevents_path(const db_tfevents *w) { return w->path; }

int db_tfevents_close(db_tfevents *w, db_err *err)
{
    if (!w)
        return 0;
    int rc = db_tfevents_flush(w, err);
    if (fclose(w->f) && !rc)
        rc = db_err_errno(err, w->path);
    free(w->buf);
    free(w->path);
    free(w);
    return rc;
}

/* TensorFlow's name: events.out.tfevents.<seconds>.<host>.  A second writer
 * in the same directory and second gets a numeric suffix rather than
 * clobbering the first (TensorBoard reads every file with "tfevents" in its
 * name). */
static int create_file(db_tfevents *w, const char *dir, db_err *err)
{
    char host[256];
    if (gethostname(host, sizeof host) || !host[0])
        strcpy(host, "localhost");
    host[sizeof host - 1] = 0;
    for (char *c = host; *c; c++)
        if (*c == '/')
            *c = '_';
    long long secs = (long long)time(NULL);
    for (int k = 0; k < 1000; k++) {
        char name[400];
        if (k)
            snprintf(name, sizeof name, "events.out.tfevents.%lld.%s.%d", secs, host, k);
        else
            snprintf(name, sizeof name, "events.out.tfevents.%lld.%s", secs, host);
        char *path = db_path_join(dir, name);
        if (!path)
            return db_err_set(err, DB_ENOMEM, "%s: out of memory", dir);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 && errno == EEXIST) {
            free(path);
            continue;
        }
        if (fd < 0) {
            db_err_errno(err, path);
            free(path);
            return -1;
        }
        w->f = fdopen(fd, "wb");
        if (!w->f) {
            db_err_errno(err, path);
            close(fd);
            unlink(path);
            free(path);
            return -1;
        }
        w->path = path;
        return 0;
    }
    return db_err_set(err, DB_EIO, "%s: no free event file name for second %lld", dir, secs);
}

int db_tfevents_open(db_tfevents **out, const char *dir, db_err *err)
{
    *out = NULL;
    db_tfevents *w = calloc(1, sizeof *w);
    if (!w)
        return db_err_set(err, DB_ENOMEM, "%s: out of memory", dir);
    if (create_file(w, dir, err)) {
        free(w);
        return -1;
    }
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = db_tfevents_now();
    ev.what_case = TENSORBOARD__EVENT__WHAT_FILE_VERSION;
    ev.file_version = (char *)DB_TFEVENTS_VERSION;
    /* the directory entry too, so the file survives a crash with its data */
    if (write_event(w, &ev, err) || db_tfevents_flush(w, err) || db_fsync_path(dir, 1, err)) {
        unlink(w->path);
        db_tfevents_close(w, &(db_err){0});
        return -1;
    }
    *out = w;
    return 0;
}

/* An Event carrying a Summary of the one value v. */
static int write_value(db_tfevents *w, Tensorboard__Summary__Value *v, int64_t step, double wall_time, db_err *err)
{
    Tensorboard__Summary__Value *vals[1] = {v};
    Tensorboard__Summary sum = TENSORBOARD__SUMMARY__INIT;
    sum.n_value = 1;
    sum.value = vals;
    Tensorboard__Event ev = TENSORBOARD__EVENT__INIT;
    ev.wall_time = wall_time;
    ev.step = step;
    ev.what_case = TENSORBOARD__EVENT__WHAT_SUMMARY;
    ev.summary = &sum;
    if (write_event(w, &ev, err))
        return db_err_prefix(err, "tag '%s' step %lld", v->tag, (long long)step);
    return 0;
}

int db_tfevents_scalar(db_tfevents *w, const char *tag, int64_t step, double wall_time, float value, db_err *err)
{
    Tensorboard__Summary__Value v = TENSORBOARD__SUMMARY__VALUE__INIT;
    v.tag = (char *)tag;
    v.value_case = TENSORBOARD__SUMMARY__VALUE__VALUE_SIMPLE_VALUE;
    v.simple_value = value;
    return write_value(w, &v, step, wall_time, err);
}

int db_tfevents_image(db_tfevents *w, const char *tag, int64_t step, double wall_time, const uint8_t *png,
                      size_t png_len, int height, int width, int channels, db_err *err)
{
    if (height <= 0 || width <= 0 || channels < 1 || channels > 4)
        return db_err_set(err, DB_EUSAGE, "%s: image '%s': bad shape %dx%dx%d", w->path, tag, height, width,
                          channels);
    Tensorboard__Summary__Image img = TENSORBOARD__SUMMARY__IMAGE__INIT;
    img.height = height;
    img.width = width;
    img.colorspace = channels; /* 1..4 are grey, grey+alpha, RGB, RGBA */
    img.encoded_image_string.data = (uint8_t *)png;
    img.encoded_image_string.len = png_len;
    Tensorboard__Summary__Value v = TENSORBOARD__SUMMARY__VALUE__INIT;
    v.tag = (char *)tag;
    v.value_case = TENSORBOARD__SUMMARY__VALUE__VALUE_IMAGE;
    v.image = &img;
    return write_value(w, &v, step, wall_time, err);
}

/* --- reading ------------------------------------------------------------------ */

/* Read n bytes at *buf (grown as they arrive); returns how many were read. */
static size_t read_grow(FILE *f, uint8_t **buf, size_t *cap, size_t n, int *oom)
{
    size_t got = 0;
    while (got < n) {
        size_t want = n - got < READ_CHUNK ? n - got : READ_CHUNK;
        if (got + want > *cap) {
            size_t c = *cap ? *cap : READ_CHUNK;
            while (c < got + want)
                c = c > SIZE_MAX / 2 ? got + want : 2 * c;
            uint8_t *b = realloc(*buf, c);
            if (!b) {
                *oom = 1;
                return got;
            }
            *buf = b;
            *cap = c;
        }
        size_t r = fread(*buf + got, 1, want, f);
        got += r;
        if (r < want)
            break;
    }
    return got;
}

/* Hand one decoded Event to fn. */
static int deliver(const Tensorboard__Event *ev, uint64_t off, const char *name, db_tfevents_fn fn, void *user,
                   db_err *err)
{
    db_tfevents_event e = {.offset = off, .wall_time = ev->wall_time, .step = ev->step};
    db_tfevents_value *vals = NULL;
    if (ev->what_case == TENSORBOARD__EVENT__WHAT_FILE_VERSION)
        e.file_version = ev->file_version;
    if (ev->what_case == TENSORBOARD__EVENT__WHAT_SUMMARY && ev->summary->n_value) {
        const Tensorboard__Summary *s = ev->summary;
        vals = calloc(s->n_value, sizeof *vals);
        if (!vals)
            return db_err_set(err, DB_ENOMEM, "%s: record at byte %llu: out of memory", name,
                              (unsigned long long)off);
        for (size_t i = 0; i < s->n_value; i++) {
            const Tensorboard__Summary__Value *v = s->value[i];
            vals[i].tag = v->tag;
            if (v->value_case == TENSORBOARD__SUMMARY__VALUE__VALUE_SIMPLE_VALUE) {
                vals[i].kind = DB_TFV_SCALAR;
                vals[i].simple_value = v->simple_value;
            } else if (v->value_case == TENSORBOARD__SUMMARY__VALUE__VALUE_IMAGE) {
                vals[i].kind = DB_TFV_IMAGE;
                vals[i].height = v->image->height;
                vals[i].width = v->image->width;
                vals[i].colorspace = v->image->colorspace;
                vals[i].image = v->image->encoded_image_string.data;
                vals[i].image_len = v->image->encoded_image_string.len;
            }
        }
        e.n_values = s->n_value;
        e.values = vals;
    }
    int rc = fn(&e, user, err);
    free(vals);
    return rc;
}

int db_tfevents_read_stream(FILE *f, const char *name, db_tfevents_fn fn, void *user, db_err *err)
{
    uint8_t *buf = NULL;
    size_t cap = 0;
    uint64_t off = 0;
    int rc = 0;
    for (;;) {
        uint8_t head[12];
        size_t got = fread(head, 1, sizeof head, f);
        if (got == 0 && !ferror(f))
            break; /* clean end between records */
        if (got < sizeof head) {
            rc = ferror(f) ? db_err_errno(err, name)
                           : db_err_set(err, DB_EFORMAT, "%s: record at byte %llu: truncated header (%zu of 12 bytes)",
                                        name, (unsigned long long)off, got);
            break;
        }
        uint64_t len = get_le64(head);
        uint32_t want = get_le32(head + 8), have = db_tfrecord_crc(head, 8);
        if (want != have) {
            rc = db_err_set(err, DB_EFORMAT, "%s: record at byte %llu: length CRC mismatch (stored %08x, computed %08x)",
                            name, (unsigned long long)off, want, have);
            break;
        }
        if (len > SIZE_MAX - 4) {
            rc = db_err_set(err, DB_EFORMAT, "%s: record at byte %llu: length %llu too large", name,
                            (unsigned long long)off, (unsigned long long)len);
            break;
        }
        int oom = 0;
        size_t n = (size_t)len + 4; /* data and its CRC */
        got = read_grow(f, &buf, &cap, n, &oom);
        if (got < n) {
            rc = oom ? db_err_set(err, DB_ENOMEM, "%s: record at byte %llu: out of memory", name,
                                  (unsigned long long)off)
                 : ferror(f) ? db_err_errno(err, name)
                             : db_err_set(err, DB_EFORMAT,
                                          "%s: record at byte %llu: truncated (%zu of %zu data+CRC bytes)", name,
                                          (unsigned long long)off, got, n);
            break;
        }
        want = get_le32(buf + len);
        have = db_tfrecord_crc(buf, len);
        if (want != have) {
            rc = db_err_set(err, DB_EFORMAT, "%s: record at byte %llu: data CRC mismatch (stored %08x, computed %08x)",
                            name, (unsigned long long)off, want, have);
            break;
        }
        Tensorboard__Event *ev = tensorboard__event__unpack(NULL, len, buf);
        if (!ev) {
            rc = db_err_set(err, DB_EFORMAT, "%s: record at byte %llu: not a tensorboard.Event", name,
                            (unsigned long long)off);
            break;
        }
        int r = deliver(ev, off, name, fn, user, err);
        tensorboard__event__free_unpacked(ev, NULL);
        if (r) {
            rc = r < 0 ? -1 : 0;
            break;
        }
        off += 12 + n;
    }
    free(buf);
    return rc;
}

int db_tfevents_read(const char *path, db_tfevents_fn fn, void *user, db_err *err)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return db_err_errno(err, path);
    int rc = db_tfevents_read_stream(f, path, fn, user, err);
    fclose(f);
    return rc;
}
