/* A restricted pickle interpreter for PyTorch state dicts.
 *
 * torch.save writes a pickle (data.pkl) whose tensors are calls of
 * torch._utils._rebuild_tensor_v2 on "persistent" storage references; the
 * storage bytes live next to it (data/<key> in the zip).  Unpickling normally
 * means calling whatever globals the file names, which is how a .ckpt runs
 * code on load.  This interpreter calls nothing: it knows the handful of
 * globals a state dict needs and builds plain descriptions of them; any other
 * global is refused (DB_ESECURITY) before anything else happens.
 *
 * Accepted globals (module name):
 *   torch._utils _rebuild_tensor_v2 | _rebuild_parameter | _rebuild_parameter_with_state
 *   collections OrderedDict
 *   torch FloatStorage HalfStorage BFloat16Storage DoubleStorage LongStorage
 *         IntStorage ShortStorage CharStorage ByteStorage BoolStorage
 *
 * The result must be a dict.  If it has a "state_dict" key holding a dict,
 * that dict is the state dict, else the top-level dict is.  Its tensor values
 * are reported in insertion order; other values (global_step, nested dicts,
 * lists...) are skipped.  Hostile input is bounded: every read is checked,
 * the stack, memo, nesting and object count are limited, and all memory comes
 * from one arena freed on return. */
#ifndef DB_PICKLE_H
#define DB_PICKLE_H

#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"
#include "../core/tensor.h"

/* One tensor of the state dict: a strided view into a storage.
 * Shapes, strides and offset are in elements of `dtype`.  The view is checked
 * to lie inside the storage as the pickle declares it:
 * offset + sum((shape[i] - 1) * strides[i]) < storage_numel when numel > 0. */
typedef struct db_pickle_tensor {
    const char *name;       /* state-dict key */
    const char *storage;    /* storage key: the zip member <top>/data/<storage> */
    const char *location;   /* where it was saved from: "cpu", "cuda:0" (informative) */
    db_dtype dtype;         /* from the storage class (FloatStorage -> DB_F32) */
    int64_t storage_numel;  /* elements in the storage, as the pickle claims */
    int64_t offset;         /* element offset of the view in the storage */
    int ndim;
    int64_t shape[DB_MAXDIM];
    int64_t strides[DB_MAXDIM]; /* element strides, >= 0 */
} db_pickle_tensor;

/* Called once per tensor, in state-dict order.  The strings live until
 * db_pickle_tensors returns: copy what you keep.  Return 0 to go on, -1 (with
 * err filled) to stop; db_pickle_tensors then returns -1 with that error. */
typedef int (*db_pickle_tensor_fn)(void *ctx, const db_pickle_tensor *t, db_err *err);

/* Interpret the pickle in buf[0..n) and report its state dict's tensors.
 * Errors: DB_ESECURITY for a global or construct we refuse (the message names
 * it), DB_EFORMAT for malformed or truncated input, DB_EUNSUPP for valid
 * pickle we do not handle (unknown opcodes, huge ints), DB_ENOMEM. */
int db_pickle_tensors(const void *buf, size_t n, db_pickle_tensor_fn fn, void *ctx, db_err *err);

/* Does this look like a pickle (PROTO opcode with protocol 2..5)? */
int db_pickle_probe(const void *head, size_t n);

#endif
