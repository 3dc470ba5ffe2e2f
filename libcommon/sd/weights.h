/* The weights of one model component (UNet, VAE or text encoder) in memory:
 * every floating-point tensor converted to fp32 and packed into one
 * allocation in the architecture table's order (llm.c's habit), so gradients
 * and optimizer moments can share the layout and the optimizer is one flat
 * loop.  Model code finds its tensors by CompVis name (without the component
 * prefix) once, when it builds its block structure. */
#ifndef DB_WEIGHTS_H
#define DB_WEIGHTS_H

#include <stddef.h>
#include <stdint.h>

#include "../core/err.h"
#include "../io/model.h"
#include "kernels/ops.h"
#include "../io/tindex.h"
#include "arch.h"

typedef struct db_weights {
    int comp;
    size_t n;          /* tensors */
    size_t numel;      /* fp32 elements in data */
    float *data;       /* (numel) one allocation, 64-byte aligned, on ctx's device */
    db_ctx *ctx;       /* the device ctx data lives on (db_ctx_alloc); NULL: host
                          memory (malloc'd), which is also every CPU ctx's, so a CPU
                          load keeps no ctx pointer that could outlive its ctx */
    db_tindex ix;      /* name (prefix stripped) -> entry; entry.offset = element offset in data,
                          entry.shape/ndim = CompVis shape */
} db_weights;

/* Load component `comp` of m as fp32.  Non-float buffers (position_ids) are
 * skipped: nothing computes with them. */
int db_weights_load(db_weights *w, const db_model *m, int comp, db_err *err);
/* The same onto the device of ctx: on the CPU (or ctx NULL) exactly
 * db_weights_load; elsewhere through a host staging buffer, copied over
 * and freed. */
int db_weights_load_ctx(db_weights *w, db_ctx *ctx, const db_model *m, int comp, db_err *err);
/* Move host weights (ctx NULL) onto ctx's device; nothing to do for a CPU
 * ctx or weights already there.  On failure w is unchanged. */
int db_weights_to(db_weights *w, db_ctx *ctx, db_err *err);
/* Same layout, zero-filled (gradients, optimizer moments), on like's device. */
int db_weights_like(db_weights *w, const db_weights *like, db_err *err);
void db_weights_free(db_weights *w);

/* The tensor named by printf-style fmt (e.g. "input_blocks.%d.0.in_layers.2.weight"),
 * checked to hold `numel` elements (numel < 0: any).  NULL with err set when
 * missing or of another size; the message names the tensor. */
float *db_weights_get(const db_weights *w, db_err *err, int64_t numel, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

#endif
