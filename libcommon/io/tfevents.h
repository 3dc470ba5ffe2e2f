/* TensorBoard event files: RUN_DIR/events.out.tfevents.<unix-seconds>.<host>.
 *
 * A file is a sequence of TFRecords, each
 *   uint64 length (LE), uint32 masked CRC-32C of those 8 bytes (LE),
 *   length bytes of a serialized tensorboard.Event,
 *   uint32 masked CRC-32C of the data (LE),
 * with mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8.  The first record is an
 * Event whose file_version is "brain.Event:2"; then one Event per scalar
 * (Summary.Value.simple_value) or image (Summary.Value.image, a PNG).  The
 * messages are proto/tfevents.proto, encoded with protobuf-c.
 *
 * Writes are buffered; db_tfevents_flush makes them durable (fflush + fsync),
 * so a crash loses at most what came after the last flush.  A writer is used
 * by one thread at a time. */
#ifndef DB_TFEVENTS_H
#define DB_TFEVENTS_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "../core/err.h"

#define DB_TFEVENTS_VERSION "brain.Event:2"

/* The TFRecord checksum of n bytes: the masked CRC-32C. */
uint32_t db_tfrecord_crc(const void *buf, size_t n);

typedef struct db_tfevents db_tfevents;

/* Create dir/events.out.tfevents.<unix-seconds>.<hostname> (".1", ".2", ...
 * appended when that name is taken; dir must exist), write the version
 * Event and flush. */
int db_tfevents_open(db_tfevents **out, const char *dir, db_err *err);
/* wall_time: seconds since the epoch (db_tfevents_now() for "now"). */
int db_tfevents_scalar(db_tfevents *w, const char *tag, int64_t step, double wall_time, float value, db_err *err);
/* png: an encoded PNG of height x width pixels with `channels` channels
 * (1 grey, 2 grey+alpha, 3 RGB, 4 RGBA: TensorBoard's colorspace values). */
int db_tfevents_image(db_tfevents *w, const char *tag, int64_t step, double wall_time, const uint8_t *png,
                      size_t png_len, int height, int width, int channels, db_err *err);
int db_tfevents_flush(db_tfevents *w, db_err *err);
/* Flush, fsync and free (w may be NULL); the writer is freed even on error. */
int db_tfevents_close(db_tfevents *w, db_err *err);
const char *db_tfevents_path(const db_tfevents *w);
double db_tfevents_now(void);

/* --- reading ---------------------------------------------------------------- */
enum { DB_TFV_OTHER, DB_TFV_SCALAR, DB_TFV_IMAGE };

typedef struct db_tfevents_value {
    const char *tag;
    int kind;           /* DB_TFV_*: OTHER is a value type we do not decode */
    float simple_value; /* SCALAR */
    int height, width, colorspace; /* IMAGE */
    const uint8_t *image; /* IMAGE: the encoded bytes */
    size_t image_len;
} db_tfevents_value;

typedef struct db_tfevents_event {
    uint64_t offset; /* byte offset of the record in the file */
    double wall_time;
    int64_t step;
    const char *file_version; /* set on a version event, else NULL */
    size_t n_values;          /* Summary values; 0 for other events */
    const db_tfevents_value *values;
} db_tfevents_event;

/* Return 0 to go on, > 0 to stop reading (db_tfevents_read returns 0), < 0 to
 * fail (fill err; db_tfevents_read returns -1).  Pointers in ev live until the
 * callback returns. */
typedef int (*db_tfevents_fn)(const db_tfevents_event *ev, void *user, db_err *err);

/* Read every record of an event file, checking both CRCs of each and decoding
 * its Event.  A bad CRC, a truncated record or an undecodable Event is an
 * error naming the file and the record's byte offset. */
int db_tfevents_read(const char *path, db_tfevents_fn fn, void *user, db_err *err);
/* The same from an open stream (a pipe, fmemopen); name is for messages. */
int db_tfevents_read_stream(FILE *f, const char *name, db_tfevents_fn fn, void *user, db_err *err);

#endif
