/* libFuzzer target: the safetensors header validator on arbitrary bytes
 * (the input is the whole "file"; data pointers are checked for range by
 * reading every tensor's bytes back through the index). */
#include <stdint.h>
#include <string.h>

#include "libcommon/io/safetensors.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    db_tindex ix;
    db_tindex_init(&ix);
    db_err e = {0};
    json_t *meta = NULL;
    uint64_t hl = 0;
    for (int i = 7; i >= 0 && size >= 8; i--)
        hl = (hl << 8) | data[i];
    const unsigned char *base = size >= 8 && hl <= size - 8 ? data + 8 + hl : NULL;
    if (db_safetensors_parse(data, size, size, base, NULL, 0, &ix, &meta, &e) == 0) {
        /* every accepted entry must lie inside the input */
        for (size_t i = 0; i < ix.n; i++) {
            const db_tentry *t = &ix.v[i];
            if (t->nbytes) {
                const unsigned char *p = t->ptr;
                if (p < data || p + t->nbytes > data + size)
                    __builtin_trap();
                volatile unsigned char sink = p[0] ^ p[t->nbytes - 1];
                (void)sink;
            }
        }
    }
    json_decref(meta);
    db_tindex_free(&ix);
    return 0;
}
