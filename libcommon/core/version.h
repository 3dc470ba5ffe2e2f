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

/* Is `device` a device name (cpu, cpu-strict, cuda, cuda:N)?  The tools
 * check --device with it before loading anything, so a misspelt device is a
 * usage error (exit 2); whether the device is there is the context's
 * business (exit 1, naming it).  0, or -1 with the usage error in err.
 * (Until 2026-11-27 it also refused cuda without DB_CUDA_UNVERIFIED, until
 * the backend passed its checks on a GPU: tests/gpu/run.sh on an H200.) */
int db_device_check(const char *device, db_err *err);

#endif
