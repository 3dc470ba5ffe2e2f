/* Tensors: a dtype, a shape (at most DB_MAXDIM dims) and a pointer to data.
 *
 * Legend for shape comments across the project:
 *   B batch, C channels, H/W spatial, T tokens, D model width, N elements.
 *
 * A db_tensor does not always own its bytes: `owned` says whether
 * db_tensor_free releases them (memory from a mmap'd checkpoint is borrowed).
 */
#ifndef DB_TENSOR_H
#define DB_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "err.h"

#define DB_MAXDIM 8

typedef enum db_dtype {
    DB_F32 = 0,
    DB_F16,
    DB_BF16,
    DB_F64,
    DB_I64,
    DB_I32,
    DB_I16,
    DB_I8,
    DB_U8,
    DB_BOOL,
    DB_NDTYPE
} db_dtype;

/* DB_CPU_STRICT: the CPU with device discipline (kernels/ops.h, "cpu-strict"):
 * for tests only. */
typedef enum db_device { DB_CPU = 0, DB_CUDA = 1, DB_CPU_STRICT = 2 } db_device;

typedef struct db_tensor {
    db_dtype dtype;
    int ndim;
    int64_t shape[DB_MAXDIM];
    void *data;
    db_device device;
    int owned; /* 1: db_tensor_free releases data */
} db_tensor;

/* Element size in bytes; 0 for an invalid dtype. */
size_t db_dtype_size(db_dtype t);
int db_dtype_is_float(db_dtype t);
/* Our short names: "f32" "f16" "bf16" "f64" "i64" "i32" "i16" "i8" "u8" "bool". */
const char *db_dtype_name(db_dtype t);
/* safetensors names: "F32" "F16" "BF16" "F64" "I64" "I32" "I16" "I8" "U8" "BOOL". */
const char *db_dtype_st_name(db_dtype t);
/* Parse either spelling (also "fp32", "fp16", "float32"...); -1 if unknown. */
int db_dtype_parse(const char *s);

/* Product of the shape with overflow checks: -1 on overflow or a negative dim.
 * An empty shape (ndim 0) is a scalar with 1 element. */
int64_t db_shape_numel(int ndim, const int64_t *shape);
/* Byte size of numel elements of dtype; -1 on overflow. */
int64_t db_shape_nbytes(db_dtype t, int ndim, const int64_t *shape);
int db_shape_equal(int na, const int64_t *a, int nb, const int64_t *b);
/* Writes "[320, 4, 3, 3]" into buf. */
const char *db_shape_str(char *buf, size_t n, int ndim, const int64_t *shape);

int64_t db_tensor_numel(const db_tensor *t);
size_t db_tensor_nbytes(const db_tensor *t);
/* Allocate a zero-filled CPU tensor. */
int db_tensor_alloc(db_tensor *t, db_dtype dtype, int ndim, const int64_t *shape, db_err *err);
void db_tensor_free(db_tensor *t);

/* Scalar conversions, exact where the target can hold the value and
 * round-to-nearest-even otherwise (NaN stays NaN, overflow goes to inf). */
float db_f16_to_f32(uint16_t h);
uint16_t db_f32_to_f16(float f);
float db_bf16_to_f32(uint16_t b);
uint16_t db_f32_to_bf16(float f);

/* Convert n elements between any two dtypes (float <-> float rounds to nearest
 * even; float -> int truncates toward zero and saturates; bool is 0/1).
 * src and dst must not overlap unless they are the same pointer and dtype. */
int db_convert(void *dst, db_dtype dt, const void *src, db_dtype st, size_t n, db_err *err);

#endif
