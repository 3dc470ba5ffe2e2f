/* libFuzzer target: the A1111 emphasis parser on arbitrary text. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "libcommon/sd/prompt.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1);
    if (!s)
        return 0;
    memcpy(s, data, size);
    s[size] = 0;
    db_prompt p;
    db_err e = {0};
    if (!db_prompt_parse(&p, s, &e)) {
        /* every fragment's text comes from the input: never longer than it */
        size_t total = 0;
        for (size_t i = 0; i < p.n; i++)
            total += strlen(p.v[i].text);
        if (total > size + 5 * p.n)
            __builtin_trap();
        db_prompt_free(&p);
    }
    free(s);
    return 0;
}
