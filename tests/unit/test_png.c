/* PNG writer: pixels and text chunks read back with libpng; atomic failure. */
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/io/png.h"
#include "tap.h"

int main(void)
{
    const int W = 7, H = 5;
    uint8_t rgb[7 * 5 * 3];
    for (int i = 0; i < W * H * 3; i++)
        rgb[i] = (uint8_t)(i * 37 + 11);
    char path[512];
    snprintf(path, sizeof path, "%s/a.png", tap_tmpdir());
    const char *text[] = {"parameters", "a photo of sks dog\nSteps: 20, Seed: 1", "Comment", "caf\xc3\xa9", NULL};
    db_err e = {0};
    tap_ok(!db_png_write(path, rgb, W, H, text, &e), "write: %s", e.msg);

    png_image img;
    memset(&img, 0, sizeof img);
    img.version = PNG_IMAGE_VERSION;
    int ok = png_image_begin_read_from_file(&img, path);
    uint8_t back[7 * 5 * 3];
    img.format = PNG_FORMAT_RGB;
    ok = ok && png_image_finish_read(&img, NULL, back, 0, NULL);
    tap_ok(ok && img.width == (unsigned)W && img.height == (unsigned)H && !memcmp(back, rgb, sizeof rgb),
           "pixels read back equal");

    FILE *f = fopen(path, "rb");
    png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
    png_infop info = png_create_info_struct(png);
    png_textp t = NULL;
    int nt = 0, found = 0, utf8 = 0;
    if (!setjmp(png_jmpbuf(png))) {
        png_init_io(png, f);
        png_read_info(png, info);
        png_get_text(png, info, &t, &nt);
        for (int i = 0; i < nt; i++) {
            if (!strcmp(t[i].key, "parameters") && !strcmp(t[i].text, text[1]))
                found = 1;
            if (!strcmp(t[i].key, "Comment") && !strcmp(t[i].text, text[3]) &&
                t[i].compression == PNG_ITXT_COMPRESSION_NONE)
                utf8 = 1;
        }
    }
    png_destroy_read_struct(&png, &info, NULL);
    fclose(f);
    tap_ok(found, "the 'parameters' text chunk reads back (A1111 PNG info)");
    tap_ok(utf8, "a non-ASCII value goes into an iTXt chunk");

    snprintf(path, sizeof path, "%s/no-such-dir/b.png", tap_tmpdir());
    tap_ok(db_png_write(path, rgb, W, H, NULL, &e) && strstr(e.msg, "b.png"), "unwritable path reported: %s", e.msg);

    float chw[3 * 2 * 1] = {-1.0f, 1.0f, 0.0f, 2.0f, -3.0f, 0.00196f};
    uint8_t px[6];
    db_image_to_rgb8(px, chw, 1, 2);
    tap_ok(px[0] == 0 && px[3] == 255 && px[1] == 128 && px[4] == 255 && px[2] == 0 && px[5] == 128,
           "[-1,1] -> bytes as diffusers rounds and clamps (%d %d %d %d %d %d)", px[0], px[1], px[2], px[3], px[4],
           px[5]);
    return tap_done();
}
