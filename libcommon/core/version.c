#include "version.h"

#include "kernels/ops.h"

#include <dlfcn.h>
#include <jansson.h>
#include <limits.h>
#include <msgpack.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <zip.h>
#include <zmq.h>

void *db_cuda_backend_open(char *why, size_t n)
{
    char exe[PATH_MAX], path[PATH_MAX + 32];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (len <= 0) {
        snprintf(why, n, "cannot locate the executable");
        return NULL;
    }
    exe[len] = 0;
    char *slash = strrchr(exe, '/');
    if (slash)
        *slash = 0;
    snprintf(path, sizeof path, "%s/../lib/libdb_cuda.so", exe);
    if (access(path, R_OK)) {
        snprintf(why, n, "not built (no %s)", path);
        return NULL;
    }
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h)
        snprintf(why, n, "%s", dlerror());
    return h;
}

const char *db_version_text(const char *prog, char *buf, size_t n)
{
    int zmaj, zmin, zpat;
    zmq_version(&zmaj, &zmin, &zpat);
    char cuda[512];
    char why[400];
    void *h = db_cuda_backend_open(why, sizeof why);
    if (h) {
        int (*info)(char *, size_t) = (int (*)(char *, size_t))dlsym(h, "db_cuda_info");
        if (info)
            info(cuda, sizeof cuda);
        else
            snprintf(cuda, sizeof cuda, "libdb_cuda.so lacks db_cuda_info");
        dlclose(h);
    } else {
        snprintf(cuda, sizeof cuda, "%s", why);
    }
    snprintf(buf, n,
             "%s (dreambooth-c) %s\n"
             "libraries: msgpack-c %s, ZeroMQ %d.%d.%d, libzip %s, jansson %s\n"
             "cuda backend: %s\n",
             prog, DB_VERSION, msgpack_version(), zmaj, zmin, zpat, zip_libzip_version(), JANSSON_VERSION, cuda);
    return buf;
}

const char *db_version_if_asked(int argc, char **argv, const char *prog, char *buf, size_t n)
{
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--"))
            break;
        if (!strcmp(argv[i], "--version"))
            return db_version_text(prog, buf, n);
    }
    buf[0] = 0;
    return buf;
}

int db_device_check(const char *device, db_err *err)
{
    db_device dev;
    int index;
    if (db_device_parse(device, &dev, &index) == 0)
        return 0;
    return db_err_set(err, DB_EUSAGE, "--device %s: unknown device (cpu, cpu-strict, cuda or cuda:N)", device);
}
