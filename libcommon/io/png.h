/* PNG output through libpng: 8-bit RGB with text chunks (A1111 and
 * stable-diffusion.cpp read the generation settings back from a tEXt chunk
 * named "parameters").  Written atomically like every output. */
#ifndef DB_PNG_H
#define DB_PNG_H

#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"

/* rgb (H, W, 3) bytes.  text: NULL-terminated list of key, value pairs (may
 * be NULL); values are Latin-1 in tEXt, so any non-ASCII value is written as
 * an iTXt (UTF-8) chunk instead. */
int db_png_write(const char *path, const uint8_t *rgb, int W, int H, const char *const *text, db_err *err);

/* Image tensor (3, H, W) in [-1, 1] (the VAE's output) -> (H, W, 3) bytes,
 * as diffusers does: (x / 2 + 0.5).clamp(0, 1) * 255, rounded. */
void db_image_to_rgb8(uint8_t *rgb, const float *chw, int H, int W);

#endif
