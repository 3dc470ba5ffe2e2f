#include "png.h"

#include <math.h>
#include <png.h>
#include <setjmp.h>
#include <stdlib.h>
#include <string.h>

#include "../core/fsutil.h"

static int is_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80)
            return 0;
    return 1;
}

/* libpng reports errors by longjmp; keep the state that must survive it in a
 * struct the setjmp frame does not optimise into registers. */
typedef struct png_job {
    db_outfile of;
    png_structp png;
    png_infop info;
    png_textp texts;
    png_bytepp rows;
    char msg[256];
} png_job;

static void on_error(png_structp png, png_const_charp msg)
{
    png_job *j = png_get_error_ptr(png);
    snprintf(j->msg, sizeof j->msg, "%s", msg);
    png_longjmp(png, 1);
}

static void on_warning(png_structp png, png_const_charp msg) { (void)png, (void)msg; }

int db_png_write(const char *path, const uint8_t *rgb, int W, int H, const char *const *text, db_err *err)
{
    if (W <= 0 || H <= 0 || W > 1 << 20 || H > 1 << 20)
        return db_err_set(err, DB_EUSAGE, "%s: bad image size %dx%d", path, W, H);
    png_job *volatile j = calloc(1, sizeof *j);
    if (!j)
        return db_err_set(err, DB_ENOMEM, "out of memory");
    int nt = 0;
    while (text && text[2 * nt] && text[2 * nt + 1])
        nt++;
    if (db_outfile_open(&j->of, path, err)) {
        free(j);
        return -1;
    }
    j->png = png_create_write_struct(PNG_LIBPNG_VER_STRING, j, on_error, on_warning);
    j->info = j->png ? png_create_info_struct(j->png) : NULL;
    j->texts = calloc((size_t)nt + 1, sizeof *j->texts);
    j->rows = malloc((size_t)H * sizeof *j->rows);
    if (!j->png || !j->info || !j->texts || !j->rows) {
        snprintf(j->msg, sizeof j->msg, "out of memory");
        goto fail;
    }
    if (setjmp(png_jmpbuf(j->png)))
        goto fail;
    png_init_io(j->png, j->of.f);
    png_set_IHDR(j->png, j->info, (png_uint_32)W, (png_uint_32)H, 8, PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                 PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
    for (int i = 0; i < nt; i++) {
        j->texts[i].key = (png_charp)text[2 * i];
        j->texts[i].text = (png_charp)text[2 * i + 1];
        j->texts[i].compression = is_ascii(text[2 * i + 1]) ? PNG_TEXT_COMPRESSION_NONE : PNG_ITXT_COMPRESSION_NONE;
    }
    if (nt)
        png_set_text(j->png, j->info, j->texts, nt);
    for (int y = 0; y < H; y++)
        j->rows[y] = (png_bytep)(rgb + (size_t)y * (size_t)W * 3);
    png_set_rows(j->png, j->info, j->rows);
    png_write_png(j->png, j->info, PNG_TRANSFORM_IDENTITY, NULL);
    png_destroy_write_struct(&j->png, &j->info);
    free(j->texts);
    free(j->rows);
    int rc = db_outfile_commit(&j->of, err);
    free(j);
    return rc;
fail:
    db_err_set(err, DB_EIO, "%s: writing PNG: %s", path, j->msg);
    if (j->png)
        png_destroy_write_struct(&j->png, j->info ? &j->info : NULL);
    free(j->texts);
    free(j->rows);
    db_outfile_abort(&j->of);
    free(j);
    return -1;
}

void db_image_to_rgb8(uint8_t *rgb, const float *chw, int H, int W)
{
    size_t hw = (size_t)H * (size_t)W;
    for (size_t p = 0; p < hw; p++)
        for (int ch = 0; ch < 3; ch++) {
            float v = chw[(size_t)ch * hw + p] * 0.5f + 0.5f;
            v = v < 0 ? 0 : v > 1 ? 1 : v;
            /* diffusers' numpy_to_pil: (images * 255).round() */
            rgb[p * 3 + (size_t)ch] = (uint8_t)lrintf(v * 255.0f);
        }
}
