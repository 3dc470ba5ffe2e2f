/* libFuzzer target for db-train's input reader (db_trainset_read): any byte
 * stream is refused cleanly or gives records that keep what trainset.h
 * promises (one shape, finite values, a prompt string each). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/sd/trainset.h"

static void check(int cond)
{
    if (!cond)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    for (int allow_fixed = 0; allow_fixed < 2; allow_fixed++) {
        db_dbt_reader *r = NULL;
        db_err e = {0};
        db_dbt_ropts ro = {.max_object = 1 << 20};
        if (db_dbt_open_mem(&r, data, size, "fuzz", &ro, &e))
            continue;
        db_trainset s;
        if (db_trainset_read(&s, r, "fuzz", allow_fixed, &e) == 0) {
            check(s.n > 0 && s.C > 0 && s.h > 0 && s.w > 0 && (allow_fixed || s.posterior));
            const size_t per = db_trainset_record_floats(&s);
            for (size_t i = 0; i < s.n * per; i++)
                check(isfinite(s.data[i]));
            for (size_t i = 0; i < s.n; i++)
                check(s.prompt[i] != NULL);
            db_trainset_free(&s);
        } else {
            check(e.code != 0 && e.msg[0]);
        }
        db_dbt_reader_close(r);
    }
    return 0;
}
