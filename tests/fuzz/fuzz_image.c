/* libFuzzer target for photo decoding: the input is a file's bytes, decoded
 * through db_image_decode exactly as db-prep decodes a file it has read,
 * then resized and cropped as db-prep would.
 *
 * Beyond "no crash, no leak": a decode that succeeds must respect the pixel
 * limit and hand back W*H*3 bytes; a failure hands back nothing.  The limit
 * is 1 megapixel here (db-prep's is 100) so that each run stays fast; the
 * code path is the same. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <vips/vips.h>

#include "libcommon/io/image.h"

#define FUZZ_MAX_PIXELS (1 << 20)

static void check(int cond)
{
    if (!cond)
        abort();
}

static void quiet_glib(const char *domain, GLogLevelFlags level, const char *msg, void *user)
{
    (void)domain, (void)level, (void)msg, (void)user;
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    if (VIPS_INIT((*argv)[0]))
        abort();
    vips_cache_set_max(0);
    vips_concurrency_set(1);
    g_log_set_handler("VIPS", G_LOG_LEVEL_WARNING, quiet_glib, NULL);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    db_rgb8 im;
    db_image_info info;
    db_err e = {0};
    if (db_image_decode(&im, &info, data, size, "fuzz", FUZZ_MAX_PIXELS, &e)) {
        check(im.px == NULL && e.msg[0]);
        vips_error_clear();
        return 0;
    }
    check(im.px && im.w > 0 && im.h > 0 && (int64_t)im.w * im.h <= FUZZ_MAX_PIXELS);
    /* touch every byte, so ASan sees the whole buffer is ours */
    unsigned sum = 0;
    for (size_t i = 0; i < (size_t)im.w * im.h * 3; i++)
        sum += im.px[i];
    (void)sum;

    db_rgb8 rs;
    int up;
    if (!db_image_resize_short(&rs, &im, 8, &up, &e)) {
        check((rs.w == 8 && rs.h >= 8) || (rs.h == 8 && rs.w >= 8));
        uint8_t crop[8 * 8 * 3];
        db_image_crop(crop, &rs, (rs.w - 8) / 2, (rs.h - 8) / 2, 8, 1);
        db_image_free(&rs);
    }
    vips_error_clear();
    db_image_free(&im);
    return 0;
}
