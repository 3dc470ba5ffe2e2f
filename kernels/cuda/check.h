// Every CUDA / cuBLAS / cuDNN call is checked, with file:line in the message.
#ifndef DB_CUDA_CHECK_H
#define DB_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <stdio.h>

#define DB_CUDA_TRY(call, msg, n, label)                                                              \
    do {                                                                                              \
        cudaError_t e_ = (call);                                                                      \
        if (e_ != cudaSuccess) {                                                                      \
            snprintf((msg), (n), "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
            goto label;                                                                               \
        }                                                                                             \
    } while (0)

#define DB_CUBLAS_TRY(call, msg, n, label)                                                            \
    do {                                                                                              \
        cublasStatus_t s_ = (call);                                                                   \
        if (s_ != CUBLAS_STATUS_SUCCESS) {                                                            \
            snprintf((msg), (n), "%s:%d: %s: cuBLAS status %d", __FILE__, __LINE__, #call, (int)s_);  \
            goto label;                                                                               \
        }                                                                                             \
    } while (0)

#define DB_CUDNN_TRY(call, msg, n, label)                                                                   \
    do {                                                                                                    \
        cudnnStatus_t s_ = (call);                                                                          \
        if (s_ != CUDNN_STATUS_SUCCESS) {                                                                   \
            snprintf((msg), (n), "%s:%d: %s: %s", __FILE__, __LINE__, #call, cudnnGetErrorString(s_));      \
            goto label;                                                                                     \
        }                                                                                                   \
    } while (0)

#endif
