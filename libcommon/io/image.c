/* Photo decode and preprocessing through libvips (see image.h). */
#include "image.h"

#include <stdlib.h>
#include <string.h>
#include <vips/vips.h>

#include "../core/fsutil.h"

/* Loaders we trust with hostile bytes: raster formats whose decoders are
 * bounded by the header's size.  Anything else (pdfload, svgload, magickload,
 * matload, fitsload, ...) is refused even when libvips could read it. */
static const char *const allowed_loaders[] = {
    "jpegload_buffer", "pngload_buffer", "webpload_buffer", "gifload_buffer",
    "tiffload_buffer", "heifload_buffer",
};

/* libvips keeps its messages in a process-wide buffer: take and clear it. */
static int vips_fail(db_err *err, int code, const char *label, const char *what)
{
    char msg[512];
    snprintf(msg, sizeof msg, "%s", vips_error_buffer());
    vips_error_clear();
    size_t n = strlen(msg);
    while (n && (msg[n - 1] == '\n' || msg[n - 1] == ' '))
        msg[--n] = 0;
    for (char *p = msg; *p; p++)
        if (*p == '\n')
            *p = ' ';
    return db_err_set(err, code, "%s: %s%s%s", label, what, n ? ": " : "", msg);
}

static const char *loader_nickname(const char *class_name)
{
    VipsObjectClass *c = (VipsObjectClass *)vips_class_find("VipsForeignLoad", class_name);
    return c ? c->nickname : NULL;
}

int db_image_decode(db_rgb8 *out, db_image_info *info, const void *buf, size_t len, const char *label,
                    int64_t max_pixels, db_err *err)
{
    db_image_info tmp;
    if (!info)
        info = &tmp;
    memset(info, 0, sizeof *info);
    memset(out, 0, sizeof *out);
    if (max_pixels <= 0)
        max_pixels = DB_IMAGE_MAX_PIXELS;
    if (len == 0)
        return db_err_set(err, DB_EFORMAT, "%s: empty file", label);

    const char *cls = vips_foreign_find_load_buffer(buf, len);
    if (!cls) {
        vips_error_clear();
        return db_err_set(err, DB_EFORMAT, "%s: not an image in a known format", label);
    }
    const char *nick = loader_nickname(cls);
    int ok = 0;
    for (size_t i = 0; nick && i < sizeof allowed_loaders / sizeof allowed_loaders[0]; i++)
        ok |= !strcmp(nick, allowed_loaders[i]);
    if (!ok)
        return db_err_set(err, DB_EUNSUPP, "%s: unsupported image format (%s); use JPEG, PNG or WebP", label,
                          nick ? nick : cls);
    snprintf(info->loader, sizeof info->loader, "%s", nick);

    /* The header only: no pixel is decoded until write_to_memory below. */
    VipsImage *t[8] = {0};
    VipsImage *im = vips_image_new_from_buffer(buf, len, "", "fail_on", VIPS_FAIL_ON_WARNING, NULL);
    int rc = -1;
    if (!im)
        return vips_fail(err, DB_EFORMAT, label, "cannot read the image header");
    info->stored_w = vips_image_get_width(im);
    info->stored_h = vips_image_get_height(im);
    info->bits = (int)(8 * vips_format_sizeof(vips_image_get_format(im)));
    if ((int64_t)info->stored_w * info->stored_h > max_pixels) {
        db_err_set(err, DB_EUNSUPP, "%s: %dx%d is more than %lld pixels (a decompression bomb?)", label,
                   info->stored_w, info->stored_h, (long long)max_pixels);
        goto done;
    }
    info->orientation = vips_image_get_orientation(im);

    VipsImage *cur = im;
    if (vips_autorot(cur, &t[0], NULL)) {
        vips_fail(err, DB_EFORMAT, label, "cannot apply the EXIF orientation");
        goto done;
    }
    cur = t[0];
    /* A broken profile should not lose the photo: assume sRGB, as browsers do. */
    if (vips_image_get_typeof(cur, VIPS_META_ICC_NAME)) {
        if (vips_icc_present() &&
            !vips_icc_transform(cur, &t[1], "srgb", "embedded", TRUE, "intent", VIPS_INTENT_RELATIVE, NULL)) {
            info->icc = 1;
            cur = t[1];
        } else {
            vips_error_clear();
            info->icc = -1;
        }
    }
    if (vips_colourspace(cur, &t[2], VIPS_INTERPRETATION_sRGB, NULL)) {
        vips_fail(err, DB_EUNSUPP, label, "cannot convert to sRGB");
        goto done;
    }
    cur = t[2];
    if (vips_image_get_format(cur) != VIPS_FORMAT_UCHAR) {
        if (vips_cast(cur, &t[3], VIPS_FORMAT_UCHAR, NULL)) {
            vips_fail(err, DB_EUNSUPP, label, "cannot convert to 8 bits");
            goto done;
        }
        cur = t[3];
    }
    if (vips_image_hasalpha(cur)) {
        VipsArrayDouble *white = vips_array_double_newv(1, 255.0);
        int bad = vips_flatten(cur, &t[4], "background", white, "max_alpha", 255.0, NULL);
        vips_area_unref(VIPS_AREA(white));
        if (bad) {
            vips_fail(err, DB_EFORMAT, label, "cannot flatten the alpha channel");
            goto done;
        }
        info->alpha = 1;
        cur = t[4];
        if (vips_image_get_format(cur) != VIPS_FORMAT_UCHAR) {
            if (vips_cast(cur, &t[5], VIPS_FORMAT_UCHAR, NULL)) {
                vips_fail(err, DB_EUNSUPP, label, "cannot convert to 8 bits");
                goto done;
            }
            cur = t[5];
        }
    }
    if (vips_image_get_bands(cur) > 3) {
        if (vips_extract_band(cur, &t[6], 0, "n", 3, NULL)) {
            vips_fail(err, DB_EUNSUPP, label, "cannot take the colour bands");
            goto done;
        }
        cur = t[6];
    }
    if (vips_image_get_bands(cur) != 3) {
        db_err_set(err, DB_EUNSUPP, "%s: %d bands after conversion to sRGB", label, vips_image_get_bands(cur));
        goto done;
    }
    int W = vips_image_get_width(cur), H = vips_image_get_height(cur);
    if ((int64_t)W * H > max_pixels) {
        db_err_set(err, DB_EUNSUPP, "%s: %dx%d is more than %lld pixels", label, W, H, (long long)max_pixels);
        goto done;
    }
    /* Decoding happens here; fail_on turns truncation and corrupt data into errors. */
    size_t n = 0;
    vips_error_clear();
    void *px = vips_image_write_to_memory(cur, &n);
    /* Some loaders (libpng on a one-tile image) report a read error and
     * still hand back the buffer; the message in vips' error buffer is then
     * the only trace of it. */
    if (!px || vips_error_buffer()[0]) {
        g_free(px);
        vips_fail(err, DB_EFORMAT, label, "cannot decode");
        goto done;
    }
    if (n != (size_t)W * H * 3) {
        g_free(px);
        db_err_set(err, DB_EFORMAT, "%s: decoder returned %zu bytes for %dx%d", label, n, W, H);
        goto done;
    }
    /* Hand back malloc'd memory, so callers never see glib. */
    if (!(out->px = malloc(n ? n : 1))) {
        g_free(px);
        db_err_set(err, DB_ENOMEM, "%s: out of memory", label);
        goto done;
    }
    memcpy(out->px, px, n);
    g_free(px);
    out->w = W;
    out->h = H;
    rc = 0;
done:
    for (int i = 7; i >= 0; i--)
        if (t[i])
            g_object_unref(t[i]);
    g_object_unref(im);
    return rc;
}

int db_image_load(db_rgb8 *out, db_image_info *info, const char *path, int64_t max_pixels, db_err *err)
{
    char *buf = NULL;
    size_t len = 0;
    memset(out, 0, sizeof *out);
    if (db_read_file(path, DB_IMAGE_MAX_FILE, &buf, &len, err))
        return -1;
    int rc = db_image_decode(out, info, buf, len, path, max_pixels, err);
    free(buf);
    return rc;
}

void db_image_free(db_rgb8 *im)
{
    if (!im)
        return;
    free(im->px);
    im->px = NULL;
    im->w = im->h = 0;
}

/* A VipsImage over our pixels (borrowed, no copy). */
static VipsImage *wrap(const db_rgb8 *in)
{
    return vips_image_new_from_memory(in->px, (size_t)in->w * in->h * 3, in->w, in->h, 3, VIPS_FORMAT_UCHAR);
}

int db_image_resize_short(db_rgb8 *out, const db_rgb8 *in, int size, int *upscaled, db_err *err)
{
    memset(out, 0, sizeof *out);
    if (size < 1 || in->w < 1 || in->h < 1)
        return db_err_set(err, DB_EUSAGE, "resize: bad size %d for %dx%d", size, in->w, in->h);
    int s = in->w < in->h ? in->w : in->h;
    if (upscaled)
        *upscaled = s < size;
    /* Each axis gets its own scale so that rounding cannot leave the short
     * side one pixel off: the short side maps to exactly `size`. */
    int W = in->w == s ? size : (int)(((int64_t)in->w * size * 2 + s) / (2 * s)); /* rounded */
    int H = in->h == s ? size : (int)(((int64_t)in->h * size * 2 + s) / (2 * s));
    if (W < size)
        W = size;
    if (H < size)
        H = size;
    /* A 1 x 100000 strip would become size x (size * 100000): refuse it
     * rather than allocate gigabytes. */
    if ((int64_t)W * H > DB_IMAGE_MAX_PIXELS)
        return db_err_set(err, DB_EUNSUPP, "resize: %dx%d would become %dx%d, more than %lld pixels", in->w, in->h,
                          W, H, (long long)DB_IMAGE_MAX_PIXELS);
    VipsImage *a = wrap(in), *b = NULL;
    if (!a)
        return vips_fail(err, DB_ENOMEM, "resize", "cannot wrap pixels");
    int rc = -1;
    if (vips_resize(a, &b, (double)W / in->w, "vscale", (double)H / in->h, "kernel", VIPS_KERNEL_LANCZOS3, NULL)) {
        vips_fail(err, DB_EUNSUPP, "resize", "failed");
        goto done;
    }
    if (vips_image_get_width(b) != W || vips_image_get_height(b) != H) {
        db_err_set(err, DB_EUNSUPP, "resize: got %dx%d, wanted %dx%d", vips_image_get_width(b),
                   vips_image_get_height(b), W, H);
        goto done;
    }
    size_t n = 0;
    void *px = vips_image_write_to_memory(b, &n);
    if (!px || n != (size_t)W * H * 3) {
        g_free(px);
        vips_fail(err, DB_EUNSUPP, "resize", "failed");
        goto done;
    }
    out->px = malloc(n);
    if (out->px)
        memcpy(out->px, px, n);
    g_free(px);
    if (!out->px) {
        db_err_set(err, DB_ENOMEM, "resize: out of memory");
        goto done;
    }
    out->w = W;
    out->h = H;
    rc = 0;
done:
    if (b)
        g_object_unref(b);
    g_object_unref(a);
    return rc;
}

int db_image_smartcrop(int *x, int *y, const db_rgb8 *in, int size, db_err *err)
{
    if (size < 1 || size > in->w || size > in->h)
        return db_err_set(err, DB_EUSAGE, "smart crop: %dx%d window in a %dx%d image", size, size, in->w, in->h);
    VipsImage *a = wrap(in), *b = NULL;
    if (!a)
        return vips_fail(err, DB_ENOMEM, "smart crop", "cannot wrap pixels");
    int rc = -1;
    if (vips_smartcrop(a, &b, size, size, "interesting", VIPS_INTERESTING_ATTENTION, NULL)) {
        vips_fail(err, DB_EUNSUPP, "smart crop", "failed");
    } else {
        /* vips_extract_area, which smartcrop ends with, records the window's
         * corner as a negative origin offset. */
        *x = -b->Xoffset;
        *y = -b->Yoffset;
        if (*x < 0 || *y < 0 || *x + size > in->w || *y + size > in->h)
            db_err_set(err, DB_EUNSUPP, "smart crop: window (%d, %d) outside the image", *x, *y);
        else
            rc = 0;
        g_object_unref(b);
    }
    g_object_unref(a);
    return rc;
}

void db_image_crop(uint8_t *dst, const db_rgb8 *in, int x, int y, int size, int flip)
{
    for (int r = 0; r < size; r++) {
        const uint8_t *src = in->px + ((size_t)(y + r) * in->w + x) * 3;
        uint8_t *d = dst + (size_t)r * size * 3;
        if (!flip) {
            memcpy(d, src, (size_t)size * 3);
            continue;
        }
        for (int c = 0; c < size; c++)
            memcpy(d + (size_t)c * 3, src + (size_t)(size - 1 - c) * 3, 3);
    }
}

void db_image_to_chw(float *chw, const uint8_t *rgb, int H, int W)
{
    size_t hw = (size_t)H * W;
    for (size_t i = 0; i < hw; i++)
        for (int c = 0; c < 3; c++)
            chw[(size_t)c * hw + i] = rgb[i * 3 + c] / 127.5f - 1.0f;
}
