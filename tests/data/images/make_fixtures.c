/* Writes the image fixtures of tests/t1300-prep.sh and tests/unit/test_image.c
 * (run make_fixtures.sh; the outputs are committed, so tests never need it).
 *
 * The EXIF pair is built so that libvips' autorot is not its own oracle:
 * rot6.jpg stores the picture turned 90 degrees counter-clockwise with
 * orientation 6 ("rotate 90 CW to display"); upright.png is rot6.jpg's stored
 * pixels turned clockwise by the plain loop below, losslessly. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vips/vips.h>
#include <zlib.h>

static void die(const char *what)
{
    fprintf(stderr, "make_fixtures: %s: %s\n", what, vips_error_buffer());
    exit(1);
}

/* A picture with no symmetry: gradients, a dark block top-left, a bar. */
static unsigned char *picture(int W, int H)
{
    unsigned char *p = malloc((size_t)W * H * 3);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            unsigned char *q = p + ((size_t)y * W + x) * 3;
            q[0] = (unsigned char)(255 * x / (W - 1));
            q[1] = (unsigned char)(255 * y / (H - 1));
            q[2] = (unsigned char)(128 + 100 * ((x / 16 + y / 16) % 2 ? 1 : -1));
            if (x < W / 3 && y < H / 2)
                q[0] = q[1] = q[2] = 20;
            if (y > H - 12 && x > W / 2)
                q[0] = 250, q[1] = 30, q[2] = 30;
        }
    return p;
}

static VipsImage *mem(void *px, int W, int H, int bands, VipsBandFormat fmt, VipsInterpretation interp)
{
    VipsImage *im = vips_image_new_from_memory_copy(px, (size_t)W * H * bands * vips_format_sizeof(fmt), W, H,
                                                    bands, fmt);
    if (!im)
        die("new_from_memory");
    im->Type = interp;
    return im;
}

static void write_file(const char *path, const void *p, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(p, 1, n, f) != n || fclose(f))
        die(path);
}

static unsigned char *read_all(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        die(path);
    fseek(f, 0, SEEK_END);
    *n = (size_t)ftell(f);
    rewind(f);
    unsigned char *p = malloc(*n);
    if (fread(p, 1, *n, f) != *n)
        die(path);
    fclose(f);
    return p;
}

int main(int argc, char **argv)
{
    if (VIPS_INIT(argc ? argv[0] : "make_fixtures"))
        die("init");
    const int W = 128, H = 80; /* upright size */

    /* stored = upright turned 90 CCW: stored (H x W pixels: width H, height W) */
    unsigned char *up = picture(W, H), *st = malloc((size_t)W * H * 3);
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++)
            memcpy(st + ((size_t)(W - 1 - x) * H + y) * 3, up + ((size_t)y * W + x) * 3, 3);
    VipsImage *s = mem(st, H, W, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    vips_image_set_int(s, VIPS_META_ORIENTATION, 6);
    if (vips_jpegsave(s, "rot6.jpg", "Q", 95, NULL))
        die("rot6.jpg");

    /* upright.png: rot6.jpg's decoded stored pixels, turned 90 CW by hand */
    VipsImage *d = vips_image_new_from_file("rot6.jpg", NULL);
    if (!d || vips_image_get_orientation(d) != 6)
        die("rot6.jpg lost its orientation tag");
    size_t n;
    unsigned char *sp = vips_image_write_to_memory(d, &n);
    int sw = d->Xsize, sh = d->Ysize;
    unsigned char *rp = malloc(n);
    for (int y = 0; y < sh; y++)
        for (int x = 0; x < sw; x++) /* CW: (x, y) -> (sh - 1 - y, x) in a sh-wide image */
            memcpy(rp + ((size_t)x * sh + (sh - 1 - y)) * 3, sp + ((size_t)y * sw + x) * 3, 3);
    VipsImage *r = mem(rp, sh, sw, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    if (vips_pngsave(r, "upright.png", NULL))
        die("upright.png");

    /* plain.jpg: the upright picture, no EXIF */
    VipsImage *u = mem(up, W, H, 3, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    if (vips_jpegsave(u, "plain.jpg", "Q", 95, NULL))
        die("plain.jpg");

    /* plain.webp: the same picture in WebP (lossless) */
    if (vips_webpsave(u, "plain.webp", "lossless", TRUE, NULL))
        die("plain.webp");

    /* alpha.png: RGBA, left half opaque picture, right half fully transparent
     * black (flattens to white) */
    unsigned char *ra = malloc((size_t)W * H * 4);
    for (int i = 0; i < W * H; i++) {
        memcpy(ra + i * 4, up + i * 3, 3);
        ra[i * 4 + 3] = (i % W) < W / 2 ? 255 : 0;
        if (ra[i * 4 + 3] == 0)
            ra[i * 4] = ra[i * 4 + 1] = ra[i * 4 + 2] = 0;
    }
    VipsImage *a = mem(ra, W, H, 4, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_sRGB);
    if (vips_pngsave(a, "alpha.png", NULL))
        die("alpha.png");

    /* rgb16.png: the picture in 16 bits (v * 257, so 8-bit value v exactly) */
    unsigned short *r16 = malloc((size_t)W * H * 3 * 2);
    for (int i = 0; i < W * H * 3; i++)
        r16[i] = (unsigned short)(up[i] * 257);
    VipsImage *b = mem(r16, W, H, 3, VIPS_FORMAT_USHORT, VIPS_INTERPRETATION_RGB16);
    if (vips_pngsave(b, "rgb16.png", NULL))
        die("rgb16.png");

    /* grey.png: 8-bit grey, the red channel of the picture */
    unsigned char *g = malloc((size_t)W * H);
    for (int i = 0; i < W * H; i++)
        g[i] = up[i * 3];
    VipsImage *gi = mem(g, W, H, 1, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W);
    if (vips_pngsave(gi, "grey.png", NULL))
        die("grey.png");

    /* Bad files. */
    size_t jn;
    unsigned char *j = read_all("plain.jpg", &jn);
    write_file("truncated.jpg", j, jn / 2);
    for (size_t i = jn / 3; i < jn - 2; i++) /* keep SOI/headers, scramble the scan */
        j[i] = (unsigned char)(i * 131 + 7);
    write_file("corrupt.jpg", j, jn);
    write_file("empty.jpg", "", 0);
    const char text[] = "This is not an image, whatever its name says.\n";
    write_file("notimage.jpg", text, sizeof text - 1);
    const char svg[] = "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"64\" height=\"64\">"
                       "<rect width=\"64\" height=\"64\" fill=\"red\"/></svg>\n";
    write_file("unsupported.svg", svg, sizeof svg - 1);

    /* bomb.png: a valid 1x1 grey PNG whose IHDR then claims 100000 x 100000
     * (CRC fixed up, so only the size is wrong) */
    unsigned char one = 0;
    VipsImage *o = mem(&one, 1, 1, 1, VIPS_FORMAT_UCHAR, VIPS_INTERPRETATION_B_W);
    void *pb;
    size_t pn;
    if (vips_pngsave_buffer(o, &pb, &pn, NULL))
        die("bomb.png");
    unsigned char *q = pb; /* 8 signature, 4 length, "IHDR", 13 data, 4 crc */
    const unsigned char dim[4] = {0x00, 0x01, 0x86, 0xa0}; /* 100000 */
    memcpy(q + 16, dim, 4);
    memcpy(q + 20, dim, 4);
    unsigned long c = crc32(0, q + 12, 17);
    q[29] = (unsigned char)(c >> 24), q[30] = (unsigned char)(c >> 16), q[31] = (unsigned char)(c >> 8),
    q[32] = (unsigned char)c;
    write_file("bomb.png", q, pn);
    vips_shutdown();
    return 0;
}
