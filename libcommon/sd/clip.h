/* The CLIP text encoder of SD1.x: transformers' CLIPTextModel (4.26), the
 * ViT-L/14 text tower in SD1.5, any size from db_text_arch.
 *
 *   x = token_embedding[ids] + position_embedding[0..T-1]          hidden[0]
 *   for each layer l (pre-LN):
 *     x = x + out_proj(attn(q_proj(ln1(x)), k_proj(..), v_proj(..)))   causal,
 *                                                  scale head_dim^-0.5
 *     x = x + fc2(act(fc1(ln2(x))))       act: quick_gelu, or gelu (erf)
 *                                                                   hidden[l+1]
 *   last_hidden_state = final_layer_norm(hidden[L])
 *
 * Outputs besides last_hidden_state:
 *   penultimate_ln  final_layer_norm(hidden[L-1]): "clip skip 2" as A1111
 *                   does it (CLIP_stop_at_last_layers = 2);
 *   pooled          the last_hidden_state row at argmax(ids) per sequence,
 *                   i.e. the first EOS (49407, the largest id) as
 *                   transformers 4.26 computes pooler_output;
 *   hidden[k]       every layer's output (db_clip_hidden), saved anyway.
 * No padding attention mask: SD1.x pads with EOS and attends to everything
 * before a token (causal mask only), as diffusers calls the model.
 * Position ids are 0..T-1 (the stored position_ids buffer is not read).
 *
 * Following llm.c, the forward keeps every activation a backward pass needs
 * (db_clip_acts), in one allocation grown to the largest B*T seen; the
 * backward (training issue) reads them.
 *
 * Shape legend: B sequences, T tokens (<= max_positions, 77 for SD),
 * N = B*T, D hidden width, I MLP width, NH heads, HS = D/NH, L layers. */
#ifndef DB_CLIP_H
#define DB_CLIP_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/ops.h"
#include "libcommon/core/err.h"
#include "libcommon/io/model.h"
#include "libcommon/sd/arch.h"
#include "libcommon/sd/weights.h"

/* Parameters of one encoder layer: pointers into a db_weights. */
typedef struct db_clip_layer {
    float *ln1_w, *ln1_b;             /* (D) layer_norm1 */
    float *q_w, *q_b, *k_w, *k_b;     /* (D, D), (D) */
    float *v_w, *v_b, *o_w, *o_b;     /* (D, D), (D); o = out_proj */
    float *ln2_w, *ln2_b;             /* (D) layer_norm2 */
    float *fc1_w, *fc1_b;             /* (I, D), (I) */
    float *fc2_w, *fc2_b;             /* (D, I), (D) */
} db_clip_layer;

/* Every parameter, bound by name to one db_weights layout (the weights, or a
 * gradient / optimizer buffer made with db_weights_like). */
typedef struct db_clip_params {
    float *wte;                       /* (V, D) token_embedding */
    float *wpe;                       /* (maxT, D) position_embedding */
    db_clip_layer *layers;            /* (L) */
    float *lnf_w, *lnf_b;             /* (D) final_layer_norm */
    int nlayers;
} db_clip_params;

/* Bind p to w's tensors (checking every size against a); p->layers is
 * allocated (free with db_clip_params_free). */
int db_clip_params_bind(db_clip_params *p, const db_weights *w, const db_text_arch *a, db_err *err);
void db_clip_params_free(db_clip_params *p);

/* What the forward saves, per layer l (L of each unless noted), for the
 * backward; sized for `cap` tokens.  All in the ctx's device memory. */
typedef struct db_clip_acts {
    size_t cap;                       /* tokens N the buffers hold */
    int32_t *ids;                     /* (N) the token ids (embedding backward) */
    float *hidden;                    /* (L+1, N, D) hidden[0] embeddings, hidden[l+1] layer l output */
    float *ln1;                       /* (L, N, D) */
    float *ln1_mean, *ln1_rstd;       /* (L, N) */
    float *q, *k, *v;                 /* (L, N, D) each: projections, heads side by side */
    float *att;                       /* (L, N, D) attention output, before out_proj */
    float *att_lse;                   /* (L, B, NH, T) log-sum-exp of each query's scores */
    float *res_mid;                   /* (L, N, D) hidden[l] + out_proj(att) */
    float *ln2;                       /* (L, N, D) */
    float *ln2_mean, *ln2_rstd;       /* (L, N) */
    float *fc1;                       /* (L, N, I) before the activation */
    float *act;                       /* (L, N, I) after it */
    float *lnf;                       /* (N, D) final_layer_norm(hidden[L]) = last_hidden_state */
    float *lnf_mean, *lnf_rstd;       /* (N) */
    float *lnp_mean, *lnp_rstd;       /* (N) of final_layer_norm(hidden[L-1]) when asked for */
    float *mem;                       /* the one allocation */
} db_clip_acts;

/* Gradient workspace of the backward, sized for `cap` tokens. */
typedef struct db_clip_grads_ws {
    size_t cap;
    float *dres;                      /* (N, D) d loss / d hidden[l], the residual stream */
    float *dln;                       /* (N, D) */
    float *dq, *dk, *dv, *datt;       /* (N, D) each */
    float *dI, *dI2;                  /* (N, I) each */
    float *mem;
} db_clip_grads_ws;

typedef struct db_clip {
    db_ctx *ctx;                      /* borrowed; every op runs on it */
    db_text_arch arch;
    db_weights w;                     /* the text encoder's weights, fp32, owned */
    db_clip_params p;                 /* bound to w */
    db_clip_acts a;                   /* of the last forward */
    db_clip_grads_ws g;               /* of the last backward */
    int B, T;                         /* sizes of the last forward (0 before the first) */
} db_clip;

/* Load the text encoder of m (any layout) and check it against m->arch.text.
 * ctx is borrowed and must outlive the model. */
int db_clip_create(db_clip **out, db_ctx *ctx, const db_model *m, db_err *err);
void db_clip_free(db_clip *c);

/* Encode B sequences of T token ids.
 *   last            (B, T, D) last_hidden_state, or NULL
 *   penultimate_ln  (B, T, D) final_layer_norm(hidden[L-1]), or NULL
 *   pooled          (B, D) pooler_output, or NULL
 *   ids             (B, T) in [0, vocab_size); host memory (the pooling
 *                   argmax is taken on the host)
 * Outputs are in the ctx's device memory.  Returns 0, or -1 with err set. */
int db_clip_forward(db_clip *c, float *last, float *penultimate_ln, float *pooled, const int32_t *ids, int B, int T,
                    db_err *err);

/* hidden_states[k] of the last forward, (B, T, D) in the workspace (valid
 * until the next forward): k = 0 the embeddings, k = 1..L the layer outputs
 * before the final layer norm.  NULL when k is out of range or there was no
 * forward yet. */
const float *db_clip_hidden(const db_clip *c, int k);

/* out (B, T, D) = final_layer_norm(hidden_states[k]) of the last forward:
 * A1111's "clip skip n" is k = L + 1 - n (n = 1 is last_hidden_state). */
int db_clip_hidden_ln(db_clip *c, float *out, int k, db_err *err);

/* Backward of the last forward with respect to last_hidden_state:
 *   grads  same layout as the weights (db_weights_like of c->w): every
 *          parameter's gradient accumulated (+=);
 *   dlast  (B, T, D) d loss / d last_hidden_state, in the ctx's memory.
 * The forward's activations must be intact (no forward, hidden_ln or trim
 * since).  Deterministic for any thread count, as the ops are.  Returns 0,
 * or -1 with err set. */
int db_clip_backward(db_clip *c, db_weights *grads, const float *dlast, db_err *err);
/* The same with a gradient sink (weights.h): units are the final layer
 * norm, the layers from the last, then the embeddings.  grads may be NULL
 * with a window. */
int db_clip_backward_to(db_clip *c, db_weights *grads, const db_grad_sink *sink, const float *dlast, db_err *err);

/* Bytes of the activations a forward of N tokens keeps, plus with backward
 * the gradient workspace (for memory plans; the same layout the model uses). */
size_t db_clip_workspace_bytes(const db_text_arch *t, size_t N, int backward);

/* Release the activation workspace (it comes back on the next forward). */
void db_clip_trim(db_clip *c);

#endif
