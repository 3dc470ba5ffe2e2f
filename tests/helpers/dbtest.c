/* dbtest: exposes library internals to the shell tests (git's test-tool idea).
 *   dbtest crc32c FILE           print crc32c of a file
 *   dbtest png-crc FILE          crc32c of a PNG's decoded RGB pixels (ignores text chunks)
 *   dbtest png-crop-crc FILE X Y W H
 *                                the same for the W x H region at (X, Y), printed as png-crc
 *                                prints it ("WxH crc"), so a region compares to a whole image
 *   dbtest tfevents FILE         one line per value of a TensorBoard event file: "step tag value"
 *                                for scalars, "step tag image WxH png N bytes" for images
 *                                (exit 1 with the reader's error)
 *   dbtest dbt-rel A B [each]    largest relative L2 between the f32 records of two streams
 *                                (each: also a line per record, its name and its own)
 *   dbtest cuda-selftest         load the CUDA backend, run its self-test
 *                                (exit 0 pass, 1 mismatch, 3 no backend/GPU)
 */
#include <dlfcn.h>
#include <png.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/core/crc32c.h"
#include "libcommon/core/fsutil.h"
#include "libcommon/core/version.h"
#include "libcommon/io/tfevents.h"
#include "libcommon/io/dbt.h"
#include <math.h>

static int print_scalars(const db_tfevents_event *ev, void *user, db_err *err)
{
    (void)user, (void)err;
    for (size_t i = 0; i < ev->n_values; i++)
        if (ev->values[i].kind == DB_TFV_SCALAR)
            printf("%lld %s %.9g\n", (long long)ev->step, ev->values[i].tag, ev->values[i].simple_value);
        else if (ev->values[i].kind == DB_TFV_IMAGE) /* the PNG's own size, from its IHDR */
            printf("%lld %s image %dx%d png %zu bytes%s\n", (long long)ev->step, ev->values[i].tag,
                   ev->values[i].width, ev->values[i].height, ev->values[i].image_len,
                   ev->values[i].image_len > 8 && !memcmp(ev->values[i].image, "\x89PNG", 4) ? "" : " (not a PNG)");
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && !strcmp(argv[1], "crc32c")) {
        char *buf;
        size_t n;
        db_err e = {0};
        if (db_read_file(argv[2], (size_t)1 << 32, &buf, &n, &e)) {
            fprintf(stderr, "dbtest: %s\n", e.msg);
            return 1;
        }
        printf("%08x\n", db_crc32c(0, buf, n));
        free(buf);
        return 0;
    }
    int crop = argc >= 7 && !strcmp(argv[1], "png-crop-crc");
    if (crop || (argc >= 3 && !strcmp(argv[1], "png-crc"))) {
        png_image img;
        memset(&img, 0, sizeof img);
        img.version = PNG_IMAGE_VERSION;
        if (!png_image_begin_read_from_file(&img, argv[2])) {
            fprintf(stderr, "dbtest: %s: %s\n", argv[2], img.message);
            return 1;
        }
        img.format = PNG_FORMAT_RGB;
        size_t n = PNG_IMAGE_SIZE(img);
        unsigned char *px = malloc(n);
        if (!px || !png_image_finish_read(&img, NULL, px, 0, NULL)) {
            fprintf(stderr, "dbtest: %s: %s\n", argv[2], img.message);
            free(px);
            return 1;
        }
        unsigned x = 0, y = 0, w = img.width, h = img.height;
        if (crop) {
            x = (unsigned)strtoul(argv[3], NULL, 10), y = (unsigned)strtoul(argv[4], NULL, 10);
            w = (unsigned)strtoul(argv[5], NULL, 10), h = (unsigned)strtoul(argv[6], NULL, 10);
            if (!w || !h || x > img.width || y > img.height || w > img.width - x || h > img.height - y) {
                fprintf(stderr, "dbtest: %s: region %ux%u at (%u, %u) outside the %ux%u image\n", argv[2], w, h, x,
                        y, img.width, img.height);
                free(px);
                return 1;
            }
        }
        uint32_t crc = 0;
        for (unsigned r = 0; r < h; r++) /* crc32c chains: rows in order = the region's bytes in order */
            crc = db_crc32c(crc, px + ((size_t)(y + r) * img.width + x) * 3, (size_t)w * 3);
        printf("%ux%u %08x\n", w, h, crc);
        free(px);
        return 0;
    }
    if (argc >= 4 && !strcmp(argv[1], "dbt-rel")) { /* largest relative L2 between matching f32 records */
        db_dbt_reader *ra = NULL, *rb = NULL;
        db_err e = {0};
        if (db_dbt_open_read(&ra, argv[2], NULL, &e) || db_dbt_open_read(&rb, argv[3], NULL, &e)) {
            fprintf(stderr, "dbtest: %s\n", e.msg);
            return 1;
        }
        double worst = 0;
        long n = 0;
        db_dbt_record x, y;
        int ga, gb;
        while ((ga = db_dbt_next(ra, &x, &e)) == 1) {
            db_tensor tx = {0}, ty = {0};
            if ((gb = db_dbt_next(rb, &y, &e)) != 1 || db_dbt_record_tensor(&x, DB_F32, &tx, &e) ||
                db_dbt_record_tensor(&y, DB_F32, &ty, &e) || db_tensor_numel(&tx) != db_tensor_numel(&ty)) {
                fprintf(stderr, "dbtest: records differ in count or shape%s%s\n", e.code ? ": " : "", e.msg);
                return 1;
            }
            double d = 0, r = 0;
            for (int64_t i = 0; i < db_tensor_numel(&tx); i++) {
                const double p = ((const float *)tx.data)[i], q = ((const float *)ty.data)[i];
                d += (p - q) * (p - q);
                r += p * p;
            }
            const double rel = r > 0 ? sqrt(d / r) : sqrt(d);
            worst = rel > worst || isnan(rel) ? rel : worst;
            if (argc >= 5 && !strcmp(argv[4], "each"))
                printf("  record %ld %s: relative L2 %.3g\n", n, x.name, rel);
            n++;
            db_tensor_free(&tx);
            db_tensor_free(&ty);
        }
        db_dbt_reader_close(ra);
        db_dbt_reader_close(rb);
        if (ga < 0) {
            fprintf(stderr, "dbtest: %s\n", e.msg);
            return 1;
        }
        printf("%ld records, largest relative L2 %.3g\n", n, worst);
        return 0;
    }
    if (argc >= 3 && !strcmp(argv[1], "tfevents")) {
        db_err e = {0};
        if (db_tfevents_read(argv[2], print_scalars, NULL, &e)) {
            fflush(stdout);
            fprintf(stderr, "dbtest: %s\n", e.msg);
            return 1;
        }
        return 0;
    }
    if (argc >= 2 && !strcmp(argv[1], "cuda-selftest")) {
        char msg[512] = "";
        void *h = db_cuda_backend_open(msg, sizeof msg);
        if (!h) {
            printf("cuda backend: %s\n", msg);
            return 3;
        }
        int (*info)(char *, size_t) = (int (*)(char *, size_t))dlsym(h, "db_cuda_info");
        int (*self)(char *, size_t) = (int (*)(char *, size_t))dlsym(h, "db_cuda_selftest");
        if (!info || !self) {
            printf("cuda backend: missing entry points\n");
            return 1;
        }
        int ndev = info(msg, sizeof msg);
        printf("cuda backend: %s\n", msg);
        if (ndev <= 0)
            return 3;
        int rc = self(msg, sizeof msg);
        printf("selftest: %s\n", msg);
        return rc == 0 ? 0 : rc == 1 ? 1 : 3;
    }
    fprintf(stderr, "usage: dbtest crc32c FILE | png-crc FILE | png-crop-crc FILE X Y W H | tfevents FILE | cuda-selftest\n");
    return 2;
}
