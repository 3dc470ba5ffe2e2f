/* --version text shared by all tools: version, libraries, and whether the
 * CUDA backend (build/lib/libdb_cuda.so, loaded on demand) is present. */
#ifndef DB_VERSION_H
#define DB_VERSION_H

#include <stddef.h>

const char *db_version_text(const char *prog, char *buf, size_t n);
/* The same, but only when argv holds "--version" (else ""): probing the CUDA
 * backend loads cuDNN and friends, which no ordinary run should pay for. */
const char *db_version_if_asked(int argc, char **argv, const char *prog, char *buf, size_t n);

/* dlopen the CUDA backend next to the executable (../lib/libdb_cuda.so).
 * Returns the handle or NULL with the reason in why. */
void *db_cuda_backend_open(char *why, size_t n);

#endif
