// CUDA backend entry points, compiled into build/lib/libdb_cuda.so and
// loaded on demand by the tools, so the CPU tools run on machines without
// CUDA.  This first file proves the toolchain path: it links cudart, cuBLAS
// and cuDNN and reports their versions and the devices it sees.
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cudnn.h>
#include <stdio.h>

#include "kernels/cuda/check.h"

// y[i] = a * x[i] + y[i]; the smallest real kernel, used by the self-test.
__global__ static void axpy_kernel(int n, float a, const float *x, float *y)
{
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n)
        y[i] += a * x[i];
}

extern "C" int db_cuda_info(char *buf, size_t n)
{
    int rt = 0, drv = 0, ndev = 0;
    cudaRuntimeGetVersion(&rt);
    cudaDriverGetVersion(&drv);
    cudaError_t e = cudaGetDeviceCount(&ndev);
    size_t cudnn = cudnnGetVersion();
    int cublas = 0;
    cublasGetProperty(MAJOR_VERSION, &cublas);
    int cublas_minor = 0;
    cublasGetProperty(MINOR_VERSION, &cublas_minor);
    int o = snprintf(buf, n, "built (CUDA runtime %d.%d, cuBLAS %d.%d, cuDNN %zu.%zu.%zu)", rt / 1000,
                     (rt % 1000) / 10, cublas, cublas_minor, cudnn / 10000, (cudnn % 10000) / 100, cudnn % 100);
    if (e != cudaSuccess || ndev == 0) {
        snprintf(buf + o, n - (size_t)o, "; no usable GPU (%s)", e == cudaSuccess ? "0 devices" : cudaGetErrorString(e));
        return 0;
    }
    for (int d = 0; d < ndev && (size_t)o < n; d++) {
        cudaDeviceProp p;
        cudaGetDeviceProperties(&p, d);
        o += snprintf(buf + o, n - (size_t)o, "; cuda:%d %s sm_%d%d %.0f GiB", d, p.name, p.major, p.minor,
                      (double)p.totalGlobalMem / (1 << 30));
    }
    return ndev;
}

// Runs axpy on the GPU and one cuBLAS SAXPY and checks both against the CPU.
// Returns 0 on success, 1 on a mismatch, -1 when no device / an error (msg).
extern "C" int db_cuda_selftest(char *msg, size_t n)
{
    const int N = 4096;
    static float x[N], y[N], y2[N];
    for (int i = 0; i < N; i++) {
        x[i] = (float)(i % 97) * 0.25f - 3.0f;
        y[i] = (float)(i % 13) - 6.0f;
    }
    float *dx = nullptr, *dy = nullptr;
    cublasHandle_t h = nullptr;
    int rc = -1;
    DB_CUDA_TRY(cudaMalloc(&dx, N * sizeof(float)), msg, n, done);
    DB_CUDA_TRY(cudaMalloc(&dy, N * sizeof(float)), msg, n, done);
    DB_CUDA_TRY(cudaMemcpy(dx, x, sizeof x, cudaMemcpyHostToDevice), msg, n, done);
    DB_CUDA_TRY(cudaMemcpy(dy, y, sizeof y, cudaMemcpyHostToDevice), msg, n, done);
    axpy_kernel<<<(N + 255) / 256, 256>>>(N, 2.0f, dx, dy);
    DB_CUDA_TRY(cudaGetLastError(), msg, n, done);
    {
        const float a = 0.5f;
        DB_CUBLAS_TRY(cublasCreate(&h), msg, n, done);
        DB_CUBLAS_TRY(cublasSaxpy(h, N, &a, dx, 1, dy, 1), msg, n, done);
    }
    DB_CUDA_TRY(cudaMemcpy(y2, dy, sizeof y2, cudaMemcpyDeviceToHost), msg, n, done);
    rc = 0;
    for (int i = 0; i < N; i++) {
        float want = y[i] + 2.0f * x[i] + 0.5f * x[i];
        if (y2[i] != want) {
            snprintf(msg, n, "element %d: gpu %g cpu %g", i, (double)y2[i], (double)want);
            rc = 1;
            break;
        }
    }
    if (rc == 0)
        snprintf(msg, n, "axpy and cublasSaxpy match the CPU on %d elements", N);
done:
    if (h)
        cublasDestroy(h);
    cudaFree(dx);
    cudaFree(dy);
    return rc;
}
