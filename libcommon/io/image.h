/* Photo input through libvips: decode, normalise, resize, crop.
 *
 * Decoding turns any allowed file into 8-bit sRGB RGB pixels the way a
 * photo viewer shows it:
 *   EXIF orientation applied (vips_autorot) -> an embedded ICC profile
 *   converted to sRGB (no profile: assumed sRGB) -> grey, 16-bit, CMYK ...
 *   to 8-bit sRGB (vips_colourspace) -> alpha flattened onto white.
 *
 * Hostile input: only the loaders in an allow-list are used (JPEG, PNG,
 * WebP, GIF, TIFF, HEIF/AVIF); PDF, SVG, ImageMagick and the rest are
 * refused, since they can fetch files, run interpreters or rasterise
 * unbounded documents.  The pixel count in the header is checked before any
 * pixel is decoded (decompression bombs), and loaders run with
 * fail_on=warning, so a truncated or corrupt file is an error rather than a
 * half-grey picture (strict on purpose: a few damaged pixels in 3-20
 * training photos are worth a re-save; --skip-bad exists for the rest).
 *
 * libvips must be initialised by the program (VIPS_INIT in main); nothing
 * here keeps state between calls.  Pixels are (H, W, 3) bytes, row-major. */
#ifndef DB_IMAGE_H
#define DB_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"

#define DB_IMAGE_MAX_PIXELS 100000000LL      /* 100 megapixels: default bomb limit */
#define DB_IMAGE_MAX_FILE (512u << 20)        /* bytes read from one file */

typedef struct db_rgb8 {
    uint8_t *px; /* (h, w, 3), malloc'd */
    int w, h;
} db_rgb8;

/* What decoding found, for messages and provenance. */
typedef struct db_image_info {
    char loader[64];  /* libvips loader nickname: "jpegload_buffer", ... */
    int stored_w, stored_h; /* as in the file, before orientation */
    int orientation;  /* EXIF orientation 1..8 (1: none) */
    int icc;          /* 1 profile converted, 0 none, -1 present but unusable (assumed sRGB) */
    int alpha;        /* 1 when an alpha channel was flattened */
    int bits;         /* bits per sample in the file (8, 16, ...) */
} db_image_info;

/* Decode an image held in memory (borrowed).  label names it in errors.
 * max_pixels <= 0 means DB_IMAGE_MAX_PIXELS.  info may be NULL. */
int db_image_decode(db_rgb8 *out, db_image_info *info, const void *buf, size_t len, const char *label,
                    int64_t max_pixels, db_err *err);
/* Read a file (at most DB_IMAGE_MAX_FILE bytes) and decode it. */
int db_image_load(db_rgb8 *out, db_image_info *info, const char *path, int64_t max_pixels, db_err *err);
void db_image_free(db_rgb8 *im);

/* Scale so the short side is exactly `size`, keeping the aspect ratio
 * (lanczos3, antialiased when shrinking).  *upscaled is set to 1 when the
 * short side was below size.  A result above DB_IMAGE_MAX_PIXELS (an
 * extreme aspect ratio) is refused. */
int db_image_resize_short(db_rgb8 *out, const db_rgb8 *in, int size, int *upscaled, db_err *err);

/* Top-left corner of the size x size window libvips' attention-based
 * smart crop picks (vips_smartcrop, VIPS_INTERESTING_ATTENTION). */
int db_image_smartcrop(int *x, int *y, const db_rgb8 *in, int size, db_err *err);

/* Copy the size x size window at (x, y) into dst (size, size, 3); flip
 * mirrors it left-right.  The window must lie inside the image. */
void db_image_crop(uint8_t *dst, const db_rgb8 *in, int x, int y, int size, int flip);

/* (H, W, 3) bytes -> (3, H, W) floats in [-1, 1]: x / 127.5 - 1, the
 * normalisation diffusers' DreamBooth script applies before the VAE. */
void db_image_to_chw(float *chw, const uint8_t *rgb, int H, int W);

#endif
