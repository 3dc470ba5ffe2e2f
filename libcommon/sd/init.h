/* Fresh weights for a tensor of the architecture table, as PyTorch /
 * diffusers / transformers would initialise a new model, from a seed.
 *
 *   DB_INIT_LINEAR_W/_B, CONV_W/_B  nn.Linear / nn.Conv2d defaults:
 *       kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
 *       weights, the same bound for biases (diffusers adds no init of its own)
 *   DB_INIT_ONE / DB_INIT_ZERO      GroupNorm / LayerNorm weight / bias, and
 *       the CLIP projection biases transformers zeroes
 *   DB_INIT_EMBED                   N(0, init_std): transformers' CLIP uses
 *       0.02 for the token and the position embedding (OpenAI's CLIP code
 *       used 0.01 for positions; we follow transformers, the reference)
 *   DB_INIT_NORMAL                  N(0, init_std): CLIP attention and MLP
 *       weights (std from the table, transformers' _init_weights)
 *   DB_INIT_POSITION_IDS            0, 1, ..., max_positions - 1
 *
 * The values are not PyTorch's bit for bit (that would need torch's
 * generator and init order); they are its distributions.  They come from a
 * counter-based generator (Philox4x32-10) keyed by (seed, CompVis name), with
 * the element index as the counter, so a tensor's values depend only on the
 * seed, its name and the element: not on thread count, tensor order, or how
 * the range is split. */
#ifndef DB_INIT_H
#define DB_INIT_H

#include <stdint.h>

#include "../core/err.h"
#include "../core/tensor.h"
#include "arch.h"

/* Write all numel(t->shape) elements, converted to dtype (any float dtype;
 * integer dtypes for position ids), to dst. */
int db_init_tensor(const db_tname *t, uint64_t seed, void *dst, db_dtype dtype, db_err *err);
/* Elements [start, start + count) of the same tensor to dst[0 .. count). */
int db_init_tensor_range(const db_tname *t, uint64_t seed, void *dst, db_dtype dtype, int64_t start, int64_t count,
                         db_err *err);

/* A model whose tensors are generated on read, for `db-ckpt init`, tests and
 * benchmarks: every tensor of arch a (position_ids included, int64) in the
 * table order, float tensors in `dtype`, no bytes held until read.  The
 * scheduler is the SD1.x default.  Close with db_model_close. */
struct db_model;
int db_model_init_random(struct db_model *m, const db_arch *a, uint64_t seed, db_dtype dtype, db_err *err);

/* The generator, exposed for tests: Philox4x32-10 of (counter, key). */
void db_philox4x32(const uint32_t ctr[4], const uint32_t key[2], uint32_t out[4]);

#endif
