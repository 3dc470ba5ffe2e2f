/* Photo decode and preprocessing (libcommon/io/image.c) on images built here
 * with libvips and encoded to memory: normalisation to 8-bit sRGB RGB,
 * EXIF orientation, ICC, the hostile-input refusals, resize, crops. */
#include <stdlib.h>
#include <string.h>
#include <vips/vips.h>

#include "libcommon/io/image.h"
#include "tap.h"

static VipsImage *mem(const void *px, int W, int H, int bands, VipsBandFormat fmt, VipsInterpretation interp)
{
    VipsImage *im = vips_image_new_from_memory_copy(px, (size_t)W * H * bands * vips_format_sizeof(fmt), W, H,
                                                    bands, fmt);
    im->Type = interp;
    return im;
}

/* Encode with a saver ("png" or "jpeg") into a g_malloc'd buffer. */
static void *encode(VipsImage *im, const char *fmt, size_t *n)
{
    void *buf = NULL;
    int bad = !strcmp(fmt, "png") ? vips_pngsave_buffer(im, &buf, n, NULL)
                                  : vips_jpegsave_buffer(im, &buf, n, "Q", 95, NULL);
    if (bad) {
        tap_diag("encode %s: %s", fmt, vips_error_buffer());
        vips_error_clear();
    }
    return buf;
}

/* Decode and return the pixels (or NULL with the error in e). */
static int decode(db_rgb8 *out, db_image_info *info, const void *buf, size_t n, int64_t maxp, db_err *e)
{
    db_err_clear(e);
    return db_image_decode(out, info, buf, n, "mem", maxp, e);
}

/* Decoder failures are the point of some checks: keep glib's copies quiet. */
static void quiet_glib(const char *domain, GLogLevelFlags level, const char *msg, void *user)
{
    (void)domain, (void)level, (void)msg, (void)user;
}

static uint8_t pattern(int x, int y, int c)
{
    return (uint8_t)((x * 37 + y * 11 + c * 85) & 255);
}

int main(int argc, char **argv)
{
    if (VIPS_INIT(argc ? argv[0] : "test_image"))
        return 1;
    g_log_set_handler("VIPS", G_LOG_LEVEL_WARNING, quiet_glib, NULL);
    db_err e = {0};
    db_rgb8 im;
    db_image_info info;
    const int W = 24, H = 16;
    uint8_t rgb[24 * 16 * 3];
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            for (int c = 0; c < 3; c++)
                rgb[(y * W + x) * 3 + c] = pattern(x, y, c);
    size_t n;
    int failed;

    /* 8-bit RGB PNG: exact */
    VipsImage *a = mem(rgb, W, H, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    void *buf = encode(a, "png", &n);
    failed = decode(&im, &info, buf, n, 0, &e);
    tap_ok(!failed && im.w == W && im.h == H && !memcmp(im.px, rgb, sizeof rgb), "RGB PNG decodes exactly %s", e.msg);
    tap_ok(!strcmp(info.loader, "pngload_buffer") && info.bits == 8 && !info.alpha && info.orientation == 1,
           "info: loader %s, %d bits", info.loader, info.bits);
    db_image_free(&im);
    g_free(buf);
    g_object_unref(a);

    /* 16-bit: v * 257 comes back as v */
    uint16_t r16[24 * 16 * 3];
    for (int i = 0; i < W * H * 3; i++)
        r16[i] = (uint16_t)(rgb[i] * 257);
    a = mem(r16, W, H, 3, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_RGB16);
    buf = encode(a, "png", &n);
    tap_ok(!decode(&im, &info, buf, n, 0, &e) && info.bits == 16 && !memcmp(im.px, rgb, sizeof rgb),
           "16-bit PNG -> 8 bits (%s)", e.msg);
    db_image_free(&im);
    g_free(buf);
    g_object_unref(a);

    /* grey -> R = G = B */
    uint8_t g[24 * 16];
    for (int i = 0; i < W * H; i++)
        g[i] = rgb[i * 3];
    a = mem(g, W, H, 1, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W);
    buf = encode(a, "png", &n);
    int same = !decode(&im, &info, buf, n, 0, &e);
    for (int i = 0; same && i < W * H; i++)
        same = im.px[i * 3] == g[i] && im.px[i * 3 + 1] == g[i] && im.px[i * 3 + 2] == g[i];
    tap_ok(same, "grey -> RGB (%s)", e.msg);
    db_image_free(&im);
    g_free(buf);
    g_object_unref(a);

    /* alpha: 0 -> white, 255 -> the colour, 128 over black -> about 127 */
    uint8_t rgba[24 * 16 * 4];
    for (int i = 0; i < W * H; i++) {
        rgba[i * 4] = rgba[i * 4 + 1] = rgba[i * 4 + 2] = 0;
        rgba[i * 4 + 3] = (uint8_t)(i % 3 == 0 ? 0 : i % 3 == 1 ? 255 : 128);
    }
    a = mem(rgba, W, H, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    buf = encode(a, "png", &n);
    same = !decode(&im, &info, buf, n, 0, &e) && info.alpha;
    for (int i = 0; same && i < W * H; i++) {
        int want = i % 3 == 0 ? 255 : i % 3 == 1 ? 0 : 127, got = im.px[i * 3];
        same = abs(got - want) <= 1 && im.px[i * 3 + 1] == got && im.px[i * 3 + 2] == got;
        if (!same)
            tap_diag("pixel %d: %d, want %d", i, got, want);
    }
    tap_ok(same, "alpha flattened onto white (%s)", e.msg);
    db_image_free(&im);
    g_free(buf);
    g_object_unref(a);

    /* 16-bit grey + alpha */
    uint16_t ga[24 * 16 * 2];
    for (int i = 0; i < W * H; i++)
        ga[i * 2] = 0, ga[i * 2 + 1] = (uint16_t)(i % 2 ? 65535 : 0);
    a = mem(ga, W, H, 2, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_GREY16);
    buf = encode(a, "png", &n);
    same = !decode(&im, &info, buf, n, 0, &e);
    for (int i = 0; same && i < W * H * 3; i++)
        same = im.px[i] == ((i / 3) % 2 ? 0 : 255);
    tap_ok(same, "16-bit grey + alpha -> 8-bit RGB on white (%s)", e.msg);
    db_image_free(&im);
    g_free(buf);
    g_object_unref(a);

    /* EXIF orientation 6: the same JPEG pixels, tagged 1 and 6; the tagged
     * one decodes as the untagged one turned 90 degrees clockwise. */
    /* (two images: jpegsave keeps the EXIF block it wrote on the image, so
     * retagging one image is not reliable) */
    a = mem(rgb, W, H, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    VipsImage *a6 = mem(rgb, W, H, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    vips_image_set_int(a6, VIPS_META_ORIENTATION, 6);
    size_t n1, n6;
    void *j1 = encode(a, "jpeg", &n1);
    void *j6 = encode(a6, "jpeg", &n6);
    g_object_unref(a6);
    db_rgb8 up;
    int okd = !decode(&im, NULL, j1, n1, 0, &e) && !decode(&up, &info, j6, n6, 0, &e);
    same = okd && info.orientation == 6 && up.w == H && up.h == W;
    for (int y = 0; same && y < H; y++)
        for (int x = 0; same && x < W; x++) /* CW: (x, y) -> (H - 1 - y, x) */
            same = !memcmp(up.px + ((size_t)x * H + (H - 1 - y)) * 3, im.px + ((size_t)y * W + x) * 3, 3);
    tap_ok(same, "EXIF orientation 6 turns the picture clockwise (%s)", e.msg);
    db_image_free(&im);
    db_image_free(&up);
    g_free(j1);
    g_free(j6);
    g_object_unref(a);

    /* ICC: saturated colours stored in Display P3 with the profile attached
     * come back as (nearly) the sRGB they started from. */
    uint8_t sat[24 * 16 * 3];
    for (int i = 0; i < W * H; i++)
        sat[i * 3] = (uint8_t)(i % 2 ? 220 : 40), sat[i * 3 + 1] = 60, sat[i * 3 + 2] = (uint8_t)(i % 5 * 50);
    a = mem(sat, W, H, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    VipsImage *p3 = NULL;
    if (vips_icc_transform(a, &p3, "p3", "input_profile", "srgb", "embedded", FALSE, NULL)) {
        tap_diag("no P3 profile in this libvips: %s", vips_error_buffer());
        vips_error_clear();
        tap_ok(1, "# SKIP ICC: libvips cannot make a P3 image");
    } else {
        buf = encode(p3, "png", &n);
        int maxd = 0, rawd = 0;
        size_t n_raw = 0;
        uint8_t *raw = vips_image_write_to_memory(p3, &n_raw);
        if (!decode(&im, &info, buf, n, 0, &e)) {
            for (int i = 0; i < W * H * 3; i++) {
                int d = abs(im.px[i] - sat[i]), dr = abs(raw[i] - sat[i]);
                maxd = d > maxd ? d : maxd;
                rawd = dr > rawd ? dr : rawd;
            }
        }
        tap_ok(info.icc == 1 && maxd <= 3 && rawd > 5, "ICC profile converted to sRGB (max diff %d; unconverted %d) %s",
               maxd, rawd, e.msg);
        db_image_free(&im);
        g_free(raw);
        g_free(buf);
        g_object_unref(p3);
    }
    g_object_unref(a);

    /* hostile input */
    a = mem(rgb, W, H, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    buf = encode(a, "png", &n);
    tap_ok(decode(&im, NULL, buf, n, W * H - 1, &e) && e.code == DB_EUNSUPP && strstr(e.msg, "24x16 is more than"),
           "pixel limit from the header: %s", e.msg);
    tap_ok(!decode(&im, NULL, buf, n, W * H, &e), "at the limit is fine");
    db_image_free(&im);
    failed = decode(&im, NULL, buf, n - 20, 0, &e);
    tap_ok(failed && strstr(e.msg, "mem: "), "PNG missing its last 20 bytes: %s", e.msg);
    failed = decode(&im, NULL, buf, n / 2, 0, &e);
    tap_ok(failed && strstr(e.msg, "mem: "), "PNG cut in half: %s", e.msg);
    tap_ok(decode(&im, NULL, buf, 0, 0, &e) && strstr(e.msg, "empty"), "zero bytes: %s", e.msg);
    tap_ok(decode(&im, NULL, "hello, world", 12, 0, &e) && strstr(e.msg, "not an image"), "text: %s", e.msg);
    const char svg[] = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"8\" height=\"8\"></svg>";
    tap_ok(decode(&im, NULL, svg, sizeof svg - 1, 0, &e) && e.code == DB_EUNSUPP, "SVG refused: %s", e.msg);
    tap_ok(im.px == NULL, "nothing handed out on failure");
    g_free(buf);
    g_object_unref(a);

    /* resize: short side exactly `size`, aspect kept, upscaling reported */
    db_rgb8 src = {rgb, W, H}, rs;
    int upf = -1;
    failed = db_image_resize_short(&rs, &src, 8, &upf, &e);
    tap_ok(!failed && rs.w == 12 && rs.h == 8 && upf == 0, "24x16 -> 12x8 (%dx%d)", rs.w, rs.h);
    db_image_free(&rs);
    tap_ok(!db_image_resize_short(&rs, &src, 64, &upf, &e) && rs.w == 96 && rs.h == 64 && upf == 1,
           "24x16 -> 96x64, upscaled");
    db_image_free(&rs);
    db_rgb8 tall = {rgb, H, W};
    failed = db_image_resize_short(&rs, &tall, 10, &upf, &e);
    tap_ok(!failed && rs.w == 10 && rs.h == 15, "16x24 -> 10x15 (%dx%d)", rs.w, rs.h);
    db_image_free(&rs);
    tap_ok(!db_image_resize_short(&rs, &src, 16, &upf, &e) && rs.w == W && !memcmp(rs.px, rgb, sizeof rgb),
           "the size it already has: pixels untouched");
    db_image_free(&rs);

    uint8_t strip[3 * 1000];
    memset(strip, 7, sizeof strip);
    db_rgb8 st = {strip, 1000, 1};
    failed = db_image_resize_short(&rs, &st, 20000, &upf, &e);
    tap_ok(failed && rs.px == NULL && strstr(e.msg, "more than"), "extreme aspect ratio refused: %s", e.msg);

    /* crop and flip */
    uint8_t c[4 * 4 * 3];
    db_image_crop(c, &src, 5, 3, 4, 0);
    same = 1;
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++)
            for (int k = 0; k < 3; k++)
                same &= c[(y * 4 + x) * 3 + k] == pattern(5 + x, 3 + y, k);
    tap_ok(same, "crop takes the window at (x, y)");
    db_image_crop(c, &src, 5, 3, 4, 1);
    same = 1;
    for (int y = 0; y < 4; y++)
        for (int x = 0; x < 4; x++)
            for (int k = 0; k < 3; k++)
                same &= c[(y * 4 + x) * 3 + k] == pattern(5 + 3 - x, 3 + y, k);
    tap_ok(same, "flip mirrors it left-right");

    /* to floats */
    uint8_t px[2 * 3] = {0, 255, 51, 255, 0, 102};
    float f[6];
    db_image_to_chw(f, px, 1, 2);
    tap_ok(f[0] == -1 && f[1] == 1 && f[2] == 1 && f[3] == -1 && f[4] > -0.61f && f[4] < -0.59f && f[5] > -0.21f &&
               f[5] < -0.19f,
           "(H, W, 3) bytes -> (3, H, W) in [-1, 1]");

    /* smart crop: flat grey with a busy colourful patch on the right */
    static uint8_t wide[96 * 32 * 3];
    for (int y = 0; y < 32; y++)
        for (int x = 0; x < 96; x++)
            for (int k = 0; k < 3; k++)
                wide[(y * 96 + x) * 3 + k] = x >= 70 ? (uint8_t)(((x * 7 + y * 13) % 2) * 255 * (k != 1))
                                                     : 128;
    db_rgb8 wi = {wide, 96, 32};
    int sx = -1, sy = -1;
    failed = db_image_smartcrop(&sx, &sy, &wi, 32, &e);
    tap_ok(!failed && sy == 0 && sx > 32 && sx <= 64, "smart crop goes to the busy patch (x %d, y %d)", sx, sy);
    tap_ok(db_image_smartcrop(&sx, &sy, &wi, 40, &e), "a window larger than the image is refused");

    vips_shutdown();
    return tap_done();
}
