/* --version text shared by all tools: version, libraries, and whether the
 * CUDA backend (build/lib/libdb_cuda.so, loaded on demand) is present. */
#ifndef DB_VERSION_H
#define DB_VERSION_H

#include <stddef.h>

#include "err.h"

const char *db_version_text(const char *prog, char *buf, size_t n);
/* The same, but only when argv holds "--version" (else ""): probing the CUDA
 * backend loads cuDNN and friends, which no ordinary run should pay for. */
const char *db_version_if_asked(int argc, char **argv, const char *prog, char *buf, size_t n);

/* dlopen the CUDA backend next to the executable (../lib/libdb_cuda.so).
 * Returns the handle or NULL with the reason in why. */
void *db_cuda_backend_open(char *why, size_t n);

/* May a tool run on --device `device`?  "cpu" always; anything else only
 * while the environment has DB_CUDA_UNVERIFIED: the CUDA kernels pass the
 * CPU-emulator parity test but have not yet passed make check-cuda on a GPU
 * (README, kernels/cuda/NOTES.md).  0, or -1 with the usage error in err. */
int db_device_check(const char *device, db_err *err);

#endif
