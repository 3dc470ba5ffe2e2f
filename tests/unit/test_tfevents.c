/* TensorBoard event files: round trip through the reader, TFRecord framing
 * and CRCs checked with an independent bitwise CRC-32C, one scalar Event
 * compared byte for byte with protobuf wire bytes written out by hand (so a
 * wrong field number fails), and damaged files refused with the offset. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "libcommon/core/fsutil.h"
#include "libcommon/io/png.h"
#include "libcommon/io/tfevents.h"
#include "tap.h"

/* CRC-32C one bit at a time (reflected polynomial 0x82F63B78), masked as
 * TFRecord does: nothing shared with libcommon/core/crc32c.c. */
static uint32_t ref_masked_crc(const uint8_t *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    for (size_t i = 0; i < n; i++) {
        c ^= p[i];
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
    }
    c = ~c;
    return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

static uint32_t le32(const uint8_t *p) { return (uint32_t)le64((const uint8_t[8]){p[0], p[1], p[2], p[3]}); }

typedef struct seen {
    int n, versions, scalars, images;
    char tags[8][32];
    int64_t steps[8];
    double walls[8];
    float values[8];
    int h, w, cs;
    uint8_t png[4096];
    size_t png_len;
    uint64_t offsets[8];
} seen;

static int collect(const db_tfevents_event *ev, void *user, db_err *err)
{
    seen *s = user;
    if (s->n >= 8)
        return db_err_set(err, DB_EFORMAT, "too many events");
    int i = s->n++;
    s->offsets[i] = ev->offset;
    s->steps[i] = ev->step;
    s->walls[i] = ev->wall_time;
    if (ev->file_version && !strcmp(ev->file_version, "brain.Event:2"))
        s->versions++;
    for (size_t k = 0; k < ev->n_values; k++) {
        const db_tfevents_value *v = &ev->values[k];
        snprintf(s->tags[i], sizeof s->tags[i], "%s", v->tag);
        if (v->kind == DB_TFV_SCALAR) {
            s->scalars++;
            s->values[i] = v->simple_value;
        } else if (v->kind == DB_TFV_IMAGE && v->image_len <= sizeof s->png) {
            s->images++;
            s->h = v->height, s->w = v->width, s->cs = v->colorspace;
            memcpy(s->png, v->image, v->image_len);
            s->png_len = v->image_len;
        }
    }
    return 0;
}

static int write_bytes(const char *path, const uint8_t *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    int ok = f && fwrite(p, 1, n, f) == n;
    return (f && fclose(f) == 0) && ok;
}

int main(void)
{
    const uint8_t kat[] = "123456789";
    tap_ok(db_tfrecord_crc(kat, 9) == 0xc78ab0e5u && ref_masked_crc(kat, 9) == 0xc78ab0e5u,
           "masked CRC-32C of \"123456789\" (crc 0xe3069283) is 0xc78ab0e5 (lib %08x, ref %08x)",
           db_tfrecord_crc(kat, 9), ref_masked_crc(kat, 9));

    /* an RGB PNG, 3 wide and 2 high, through the project's own writer */
    uint8_t rgb[2 * 3 * 3];
    for (int i = 0; i < (int)sizeof rgb; i++)
        rgb[i] = (uint8_t)(i * 13);
    char pngpath[512];
    snprintf(pngpath, sizeof pngpath, "%s/x.png", tap_tmpdir());
    db_err e = {0};
    char *png = NULL;
    size_t png_len = 0;
    tap_ok(!db_png_write(pngpath, rgb, 3, 2, NULL, &e) && !db_read_file(pngpath, 1 << 20, &png, &png_len, &e),
           "test PNG made: %s", e.msg);

    char dir[512];
    snprintf(dir, sizeof dir, "%s/run", tap_tmpdir());
    mkdir(dir, 0755);
    db_tfevents *w = NULL;
    int ok = !db_tfevents_open(&w, dir, &e);
    tap_ok(ok, "open: %s", e.msg);
    if (!ok)
        return tap_done();
    char path[1024];
    snprintf(path, sizeof path, "%s", db_tfevents_path(w));
    char prefix[600];
    snprintf(prefix, sizeof prefix, "%s/events.out.tfevents.", dir);
    tap_ok(!strncmp(path, prefix, strlen(prefix)), "file name %s", path);
    db_tfevents *w2 = NULL;
    ok = !db_tfevents_open(&w2, dir, &e);
    tap_ok(ok && strcmp(db_tfevents_path(w2), path), "a second writer gets its own file (%s)", ok ? db_tfevents_path(w2) : e.msg);
    db_tfevents_close(w2, &e);

    ok = !db_tfevents_scalar(w, "loss", 7, 1.5, 0.25f, &e) && !db_tfevents_scalar(w, "lr", 8, 2.0, 1e-4f, &e) &&
         !db_tfevents_image(w, "samples/0", 9, 3.0, (const uint8_t *)png, png_len, 2, 3, 3, &e) &&
         !db_tfevents_flush(w, &e);
    tap_ok(ok, "two scalars and an image written: %s", e.msg);
    tap_ok(db_tfevents_image(w, "bad", 1, 1.0, (const uint8_t *)png, png_len, 2, 3, 5, &e) && strstr(e.msg, "bad"),
           "5 channels refused: %s", e.msg);
    db_err_clear(&e);
    tap_ok(!db_tfevents_close(w, &e), "close: %s", e.msg);

    seen *s = calloc(1, sizeof *s);
    ok = !db_tfevents_read(path, collect, s, &e);
    tap_ok(ok && s->n == 4 && s->versions == 1 && s->scalars == 2 && s->images == 1, "read back: %d events (%s)", s->n,
           e.msg);
    tap_ok(!strcmp(s->tags[1], "loss") && s->steps[1] == 7 && s->walls[1] == 1.5 && s->values[1] == 0.25f &&
               !strcmp(s->tags[2], "lr") && s->steps[2] == 8 && s->walls[2] == 2.0 && s->values[2] == 1e-4f,
           "scalars read back equal (tag, step, wall time, value)");
    tap_ok(!strcmp(s->tags[3], "samples/0") && s->steps[3] == 9 && s->h == 2 && s->w == 3 && s->cs == 3 &&
               s->png_len == png_len && !memcmp(s->png, png, png_len),
           "image read back equal (2x3, colorspace 3, same PNG bytes)");
    free(s);

    /* the raw file, record by record, with the reference CRC */
    char *raw = NULL;
    size_t n = 0;
    tap_ok(!db_read_file(path, 1 << 24, &raw, &n, &e), "read raw: %s", e.msg);
    const uint8_t *u = (const uint8_t *)raw;
    size_t off = 0, starts[8] = {0}, lens[8] = {0};
    int nrec = 0, crcs_ok = 1;
    while (raw && off + 12 <= n && nrec < 8) {
        uint64_t len = le64(u + off);
        if (off + 16 + len > n)
            break;
        crcs_ok &= le32(u + off + 8) == ref_masked_crc(u + off, 8);
        crcs_ok &= le32(u + off + 12 + len) == ref_masked_crc(u + off + 12, len);
        starts[nrec] = off;
        lens[nrec++] = len;
        off += 16 + len;
    }
    tap_ok(nrec == 4 && off == n && crcs_ok, "4 TFRecords fill the file, both CRCs of each correct (%d, %zu/%zu)", nrec,
           off, n);
    /* Event{wall_time=1 double, file_version=3 string} */
    const uint8_t *v = u + starts[0] + 12;
    tap_ok(lens[0] == 24 && v[0] == 0x09 && !memcmp(v + 9, "\x1a\x0d" "brain.Event:2", 15),
           "first record: wall_time (field 1) and file_version (field 3) \"brain.Event:2\"");
    /* Event{wall_time=1.5 (1, fixed64), step=7 (2, varint), summary (5, bytes):
     *   Summary{value (1, bytes): Value{tag="loss" (1, bytes), simple_value=0.25 (2, fixed32)}}} */
    static const uint8_t want[] = {0x09, 0, 0, 0, 0, 0, 0, 0xf8, 0x3f, /* 1.5 */
                                   0x10, 0x07,                         /* step 7 */
                                   0x2a, 0x0d,                         /* summary, 13 bytes */
                                   0x0a, 0x0b,                         /* value, 11 bytes */
                                   0x0a, 0x04, 'l', 'o', 's', 's',     /* tag */
                                   0x15, 0, 0, 0x80, 0x3e};            /* 0.25f */
    tap_ok(lens[1] == sizeof want && !memcmp(u + starts[1] + 12, want, sizeof want),
           "scalar Event matches hand-encoded wire bytes (%zu bytes)", lens[1]);
    tap_ok(le64(u + starts[1]) == 26 && le32(u + starts[1] + 8) == ref_masked_crc(u + starts[1], 8) &&
               le32(u + starts[1] + 12 + 26) == ref_masked_crc(want, sizeof want),
           "its framing: length 26 and masked CRCs of length and data");

    /* damage: a flipped data byte, a flipped length byte, a short file */
    char bad[600];
    snprintf(bad, sizeof bad, "%s/bad.tfevents", tap_tmpdir());
    char at[64];
    snprintf(at, sizeof at, "byte %zu", starts[2]);
    u = (uint8_t *)raw;
    raw[starts[2] + 14] ^= 0x40;
    ok = write_bytes(bad, u, n) && db_tfevents_read(bad, collect, &(seen){0}, &e) < 0;
    tap_ok(ok && strstr(e.msg, "bad.tfevents") && strstr(e.msg, at) && strstr(e.msg, "data CRC"), "flipped data byte: %s",
           e.msg);
    raw[starts[2] + 14] ^= 0x40;
    raw[starts[2] + 1] ^= 0x01;
    ok = write_bytes(bad, u, n) && db_tfevents_read(bad, collect, &(seen){0}, &e) < 0;
    tap_ok(ok && strstr(e.msg, at) && strstr(e.msg, "length CRC"), "flipped length byte: %s", e.msg);
    raw[starts[2] + 1] ^= 0x01;
    snprintf(at, sizeof at, "byte %zu", starts[3]);
    ok = write_bytes(bad, u, n - 5) && db_tfevents_read(bad, collect, &(seen){0}, &e) < 0;
    tap_ok(ok && strstr(e.msg, at) && strstr(e.msg, "truncated"), "truncated in the data: %s", e.msg);
    ok = write_bytes(bad, u, starts[3] + 5) && db_tfevents_read(bad, collect, &(seen){0}, &e) < 0;
    tap_ok(ok && strstr(e.msg, at) && strstr(e.msg, "truncated"), "truncated in a header: %s", e.msg);
    ok = write_bytes(bad, u, starts[3]) && !db_tfevents_read(bad, collect, &(seen){0}, &e);
    tap_ok(ok, "cut between records: the records before it read (%s)", ok ? "ok" : e.msg);
    free(raw);
    free(png);

    snprintf(bad, sizeof bad, "%s/no-such-dir", tap_tmpdir());
    tap_ok(db_tfevents_open(&w, bad, &e) && strstr(e.msg, "no-such-dir") && !w, "missing directory: %s", e.msg);
    return tap_done();
}
