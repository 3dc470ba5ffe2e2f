/* libFuzzer target: the JSON config reader (diffusers config.json ->
 * architecture), then the tensor table generated from whatever it accepted. */
#include <jansson.h>
#include <stdint.h>
#include <stdlib.h>

#include "libcommon/sd/arch.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    json_error_t je;
    json_t *j = json_loadb((const char *)data, size, JSON_REJECT_DUPLICATES, &je);
    if (!j)
        return 0;
    for (int comp = 0; comp < DB_NCOMP; comp++) {
        db_arch a;
        db_err e = {0};
        if (db_arch_preset(&a, "tiny", &e))
            __builtin_trap();
        const json_t *u = comp == DB_COMP_UNET ? j : NULL, *v = comp == DB_COMP_VAE ? j : NULL,
                     *t = comp == DB_COMP_TEXT ? j : NULL;
        if (db_arch_from_config(&a, u, v, t, &e) == 0) {
            db_tname *rows = NULL;
            size_t n = 0;
            /* an accepted config must give a table, within sane size */
            if (db_arch_names(&a, &rows, &n, &e) == 0) {
                json_t *c = db_arch_to_config(&a, comp);
                json_decref(c);
            }
            free(rows);
        }
    }
    json_decref(j);
    return 0;
}
