/* PyTorch checkpoints (.ckpt, .pt, pytorch_model.bin): the zip format of
 * torch.save since torch 1.6, read without running any of its pickle.
 *
 * Archive layout (one top folder of any name, "archive/" by default):
 *   <top>/data.pkl     the pickled object: a state dict, or {"state_dict": ...}
 *   <top>/data/<key>   raw little-endian bytes of storage <key>
 *   <top>/version      format version (ignored)
 *   <top>/byteorder    "little" (absent in older files, which are little too)
 *
 * data.pkl is interpreted by the restricted unpickler (pickle.h); any global
 * beyond tensors and state dicts is refused with DB_ESECURITY.  Every tensor
 * becomes a tindex entry whose bytes are read lazily from its storage member.
 * Legacy (pre-1.6, non-zip) torch.save files are refused. */
#ifndef DB_CKPT_H
#define DB_CKPT_H

#include <stddef.h>

#include "../core/err.h"
#include "tindex.h"

#define DB_CKPT_MAX_PKL (256u << 20) /* largest data.pkl we load (SD1.5's is < 1 MB) */

typedef struct db_ckpt db_ckpt;

/* Open `path` and add one entry per state-dict tensor to ix, named by its
 * state-dict key, with comp = -1.  Entries read through a source owned by
 * *out; their `key` is the storage's zip index, `offset` and `strides` the
 * view's element offset and real element strides (never the all-zero
 * shorthand: a broadcast view may have all-zero strides).  Non-contiguous
 * views are gathered into C order on read.  Storage sizes are checked
 * against the pickle, and every view against its storage, here.
 * On failure nothing is added to ix and the message names the file.
 * Reads use one zip handle: one thread at a time per db_ckpt. */
int db_ckpt_open(db_ckpt **out, const char *path, db_tindex *ix, db_err *err);

/* Close the file; entries read from it must not be read afterwards.  The
 * entries' src->close(src) does the same (use one or the other).  NULL is ok. */
void db_ckpt_close(db_ckpt *c);

/* 1 when the first n bytes look like a zip (local file header "PK\3\4"), the
 * container of every torch.save file since 1.6; 0 otherwise. */
int db_ckpt_probe(const void *head, size_t n);

#endif
