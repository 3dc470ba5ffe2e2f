/* libFuzzer target: the restricted unpickler on arbitrary bytes.
 * Beyond "no crash, no leak, no UB" it checks what callers rely on: every
 * reported tensor is a view inside its storage, with sane dims and strings,
 * and a failure always carries an error code and message. */
#include <stdint.h>
#include <string.h>

#include "libcommon/io/pickle.h"

static int check_tensor(void *ctx, const db_pickle_tensor *t, db_err *err)
{
    (void)err;
    if (t->ndim < 0 || t->ndim > DB_MAXDIM || !t->name || !t->storage || !t->location ||
        db_dtype_size(t->dtype) == 0 || t->offset < 0 || t->storage_numel < 0)
        __builtin_trap();
    int64_t last = t->offset, numel = db_shape_numel(t->ndim, t->shape);
    if (numel < 0)
        __builtin_trap();
    for (int d = 0; d < t->ndim; d++) {
        if (t->strides[d] < 0)
            __builtin_trap();
        if (numel)
            last += (t->shape[d] - 1) * t->strides[d];
    }
    if (numel && last >= t->storage_numel)
        __builtin_trap();
    (void)strlen(t->name); /* ASan checks the strings are terminated */
    (void)strlen(t->storage);
    ++*(size_t *)ctx;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    db_err err = {0};
    size_t n = 0;
    if (db_pickle_tensors(data, size, check_tensor, &n, &err) < 0 && (err.code == 0 || err.msg[0] == 0))
        __builtin_trap();
    return 0;
}
