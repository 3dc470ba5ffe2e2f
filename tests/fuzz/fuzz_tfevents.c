/* libFuzzer target for the TensorBoard event-file reader: the input is a
 * file's bytes, read through db_tfevents_read_stream as db-ckpt info would.
 *
 * Beyond "no crash, no leak, no allocation beyond the input": every event
 * handed out has sane values, and an image's bytes lie inside its record. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/io/tfevents.h"

static void check(int cond)
{
    if (!cond)
        abort();
}

static int visit(const db_tfevents_event *ev, void *user, db_err *err)
{
    size_t size = *(size_t *)user;
    check(ev->offset + 16 <= size);
    check(ev->n_values == 0 || ev->values);
    for (size_t i = 0; i < ev->n_values; i++) {
        const db_tfevents_value *v = &ev->values[i];
        check(v->tag != NULL);
        (void)strlen(v->tag);
        if (v->kind == DB_TFV_IMAGE) {
            check(v->image_len <= size);
            volatile uint8_t sum = 0;
            for (size_t k = 0; k < v->image_len; k++)
                sum += v->image[k];
        }
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!size)
        return 0;
    FILE *f = fmemopen((void *)data, size, "rb");
    if (!f)
        return 0;
    db_err e = {0};
    if (db_tfevents_read_stream(f, "fuzz", visit, &size, &e))
        check(e.msg[0] != 0);
    fclose(f);
    return 0;
}
