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
#include "optim.h"

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

/* ---- gradient units ---------------------------------------------------------------- */

/* The unit of a backward pass that finishes a weight's gradient: a UNet
 * step (input_blocks.N.M, middle_block.M, output_blocks.N.M, time_embed,
 * out) or a text-encoder layer (text_model.encoder.layers.N,
 * text_model.embeddings, text_model.final_layer_norm).  The trainer's fused
 * optimizer step (db_train_opts.fused_backward) updates a unit's weights as
 * soon as its backward is done.  The key of a CompVis name (with or without
 * its component prefix) is the name's first characters: this returns their
 * count, 0 for a name of no unit. */
size_t db_grad_unit_key(int comp, const char *name);

/* [lo, hi): element offsets in w->data of the unit `key` (its tensors and
 * their alignment padding; padded 1 when there is any: floats of no tensor,
 * which no backward op writes).  Refused when the unit has no tensor or
 * another unit's tensor lies inside (a layout a unit-by-unit update cannot
 * use). */
typedef struct db_span {
    size_t lo, hi;
    int padded;
} db_span;
int db_weights_span(const db_weights *w, const char *key, db_span *out, db_err *err);

/* Floats of the largest unit among n tensors of component comp in layout
 * order (names[i] with numels[i] elements), alignment padding included:
 * the gradient window the fused optimizer step needs. */
size_t db_grad_window_floats(int comp, const char *const *names, const size_t *numels, size_t n);
/* The same for the float tensors of component comp among v[0, n) (a
 * model's table: the layout db_weights_load makes), and for w's; 0 when
 * out of memory. */
size_t db_tentries_window_floats(const db_tentry *v, size_t n, int comp);
size_t db_weights_window_floats(const db_weights *w);
/* Bytes of the optimizer state the trainer keeps for the tensors of
 * component comp among v[0, n), tensor by tensor (db_optim_state_bytes:
 * 8-bit AdamW keeps float32 moments for the small ones): what db-train
 * --plan and bench_sd count. */
size_t db_tentries_optim_bytes(const db_tentry *v, size_t n, int comp, db_optim_kind kind);

/* Where a backward (db_unet_backward_to, db_clip_backward_to) puts the
 * weights' gradients and whom it tells when a unit's are final.
 *   window NULL: into the caller's gradient buffer (laid out like the
 *     weights, accumulated +=), as the plain backward;
 *   window non-NULL: each unit's gradients into window[0, hi - lo) (as the
 *     gradients of a zeroed window: the UNet's written, its span's padding
 *     zeroed; the text encoder's window zeroed, then added to; window_n
 *     floats must hold the largest unit), and no gradient buffer is needed;
 *   ready (may be NULL): called after each unit's backward with g = where
 *     its gradients are (window, or the buffer at lo) and its span in the
 *     weights; a failure stops the backward with that error. */
typedef struct db_grad_sink {
    float *window;
    size_t window_n;
    int (*ready)(void *user, float *g, size_t lo, size_t hi, db_err *err);
    void *user;
} db_grad_sink;

#endif
