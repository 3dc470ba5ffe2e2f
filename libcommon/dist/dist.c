/* MPI glue for data-parallel training (see dist.h). */
#include "dist.h"

#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda_api.h"
#include "kernels/ops.h"

#ifdef DB_HAVE_MPI
#include <mpi.h>
#endif

/* Was this process started by an MPI launcher? */
static int launched(void)
{
    return getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK") || getenv("MPI_LOCALNRANKS");
}

int db_dist_init(db_dist *d, int *argc, char ***argv, db_err *err)
{
    d->rank = 0, d->world = 1, d->mpi = 0;
    if (!launched())
        return 0;
#ifdef DB_HAVE_MPI
    if (MPI_Init(argc, argv) != MPI_SUCCESS)
        return db_err_set(err, DB_EIO, "MPI_Init failed");
    d->mpi = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &d->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &d->world);
    return 0;
#else
    (void)argc, (void)argv;
    return db_err_set(err, DB_EUNSUPP, "started by an MPI launcher, but built without MPI (install libopenmpi-dev "
                                       "and rebuild)");
#endif
}

static void nccl_close(db_dist *d);

void db_dist_finish(db_dist *d)
{
    nccl_close(d);
    free(d->stage);
    d->stage = NULL, d->stage_n = 0;
#ifdef DB_HAVE_MPI
    if (d->mpi)
        MPI_Finalize();
#endif
    d->mpi = 0;
}

void db_dist_abort(db_dist *d, int status)
{
#ifdef DB_HAVE_MPI
    if (d->mpi && d->world > 1)
        MPI_Abort(MPI_COMM_WORLD, status);
#endif
    (void)d, (void)status;
}

#ifdef DB_HAVE_MPI
static int sum(db_dist *d, void *x, size_t n, size_t elem, MPI_Datatype t, db_err *err)
{
    const size_t chunk = (size_t)1 << 28; /* MPI counts are int */
    for (size_t i = 0; i < n; i += chunk) {
        const int c = (int)(n - i < chunk ? n - i : chunk);
        if (MPI_Allreduce(MPI_IN_PLACE, (char *)x + i * elem, c, t, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS)
            return db_err_set(err, DB_EIO, "MPI_Allreduce of %zu values failed", n);
    }
    (void)d;
    return 0;
}
#endif

int db_dist_sum_f32(db_dist *d, float *x, size_t n, db_err *err)
{
    if (d->world == 1)
        return 0;
#ifdef DB_HAVE_MPI
    return sum(d, x, n, sizeof *x, MPI_FLOAT, err);
#else
    (void)x, (void)n;
    return db_err_set(err, DB_EUNSUPP, "built without MPI");
#endif
}

int db_dist_sum_f64(db_dist *d, double *x, size_t n, db_err *err)
{
    if (d->world == 1)
        return 0;
#ifdef DB_HAVE_MPI
    return sum(d, x, n, sizeof *x, MPI_DOUBLE, err);
#else
    (void)x, (void)n;
    return db_err_set(err, DB_EUNSUPP, "built without MPI");
#endif
}

int db_dist_max_int(db_dist *d, int *x, db_err *err)
{
    if (d->world == 1)
        return 0;
#ifdef DB_HAVE_MPI
    if (MPI_Allreduce(MPI_IN_PLACE, x, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD) != MPI_SUCCESS)
        return db_err_set(err, DB_EIO, "MPI_Allreduce failed");
    return 0;
#else
    (void)x;
    return db_err_set(err, DB_EUNSUPP, "built without MPI");
#endif
}

int db_dist_local_rank(const db_dist *d)
{
    static const char *vars[] = {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "MPI_LOCALRANKID", "PMI_LOCAL_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof vars[0]; i++) {
        const char *v = getenv(vars[i]);
        char *end;
        long r = v ? strtol(v, &end, 10) : -1;
        if (v && *v && !*end && r >= 0 && r < 1 << 20)
            return (int)r;
    }
    return d->rank;
}

/* ---- NCCL, loaded at run time ----------------------------------------------------
 * The few NCCL 2 entry points we call, declared from its public ABI
 * (nccl.h: ncclUniqueId is 128 opaque bytes, ncclSuccess 0, ncclFloat32 7,
 * ncclSum 0) so this file builds without NCCL's or CUDA's headers and the
 * tools load NCCL only when a multi-GPU job asks for it. */
enum { NCCL_ID_BYTES = 128, NCCL_FLOAT32 = 7, NCCL_SUM = 0 };
typedef struct {
    char internal[NCCL_ID_BYTES];
} nccl_id;
struct db_nccl {
    void *lib;
    void *comm;
    int (*get_unique_id)(nccl_id *);
    int (*comm_init_rank)(void **, int, nccl_id, int);
    int (*all_reduce)(const void *, void *, size_t, int, int, void *, void *);
    int (*comm_destroy)(void *);
    const char *(*error_string)(int);
};

static void nccl_close(db_dist *d)
{
    struct db_nccl *n = d->nccl;
    if (!n)
        return;
    if (n->comm)
        n->comm_destroy(n->comm);
    if (n->lib)
        dlclose(n->lib);
    free(n);
    d->nccl = NULL;
}

#ifdef DB_HAVE_MPI
/* 0 with d->nccl set, 1 when NCCL is not available (the caller stages),
 * -1 on an error every rank must stop for. */
static int nccl_open(db_dist *d, db_ctx *c, db_err *err)
{
    const char *off = getenv("DB_NCCL");
    const char *path = getenv("DB_NCCL_LIB");
    /* Every rank must take the same road: agree on whether all could load it. */
    struct db_nccl *n = calloc(1, sizeof *n);
    int ok = n && !(off && !strcmp(off, "0"));
    if (ok) {
        n->lib = dlopen(path && *path ? path : "libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
        ok = n->lib != NULL;
    }
    if (ok) {
        *(void **)&n->get_unique_id = dlsym(n->lib, "ncclGetUniqueId");
        *(void **)&n->comm_init_rank = dlsym(n->lib, "ncclCommInitRank");
        *(void **)&n->all_reduce = dlsym(n->lib, "ncclAllReduce");
        *(void **)&n->comm_destroy = dlsym(n->lib, "ncclCommDestroy");
        *(void **)&n->error_string = dlsym(n->lib, "ncclGetErrorString");
        ok = n->get_unique_id && n->comm_init_rank && n->all_reduce && n->comm_destroy && n->error_string &&
             c->cuda_api->stream;
    }
    int all = ok;
    if (MPI_Allreduce(MPI_IN_PLACE, &all, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD) != MPI_SUCCESS) {
        if (n && n->lib)
            dlclose(n->lib);
        free(n);
        return db_err_set(err, DB_EIO, "MPI_Allreduce failed while choosing the gradient transport");
    }
    if (!all) {
        if (n && n->lib)
            dlclose(n->lib);
        free(n);
        return 1;
    }
    d->nccl = n;
    nccl_id id;
    memset(&id, 0, sizeof id);
    int r = d->rank == 0 ? n->get_unique_id(&id) : 0;
    if (MPI_Bcast(&r, 1, MPI_INT, 0, MPI_COMM_WORLD) != MPI_SUCCESS ||
        MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS) {
        nccl_close(d);
        return db_err_set(err, DB_EIO, "MPI_Bcast of the NCCL id failed");
    }
    if (r != 0) {
        db_err_set(err, DB_EIO, "ncclGetUniqueId on rank 0: %s", n->error_string(r));
        nccl_close(d);
        return -1;
    }
    /* the CUDA backend made GPU N current on this thread when the ctx was created */
    r = n->comm_init_rank(&n->comm, d->world, id, d->rank);
    if (r != 0) {
        n->comm = NULL;
        db_err_set(err, DB_EIO, "ncclCommInitRank (rank %d of %d): %s", d->rank, d->world, n->error_string(r));
        nccl_close(d);
        return -1;
    }
    return 0;
}
#endif

int db_dist_bind(db_dist *d, db_ctx *c, db_err *err)
{
    if (d->world == 1 || c->device != DB_CUDA || d->nccl) /* NCCL is for CUDA buffers; the rest stage */
        return 0;
#ifdef DB_HAVE_MPI
    int r = nccl_open(d, c, err);
    return r < 0 ? -1 : 0; /* 1: no NCCL, db_dist_sum_dev stages through the host */
#else
    return db_err_set(err, DB_EUNSUPP, "built without MPI");
#endif
}

const char *db_dist_transport(const db_dist *d, const db_ctx *c)
{
    if (c->device == DB_CPU || d->world == 1)
        return "mpi";
    return d->nccl ? "nccl" : "mpi-staged";
}

int db_dist_sum_dev_start(db_dist *d, db_ctx *c, float *x, size_t n, db_err *err)
{
    if (d->world == 1 || n == 0 || !d->nccl)
        return db_dist_sum_dev(d, c, x, n, err);
    void *side = c->cuda_api->side_begin(c);
    if (c->err.code)
        return db_err_set(err, c->err.code, "%s", c->err.msg);
    d->pending = 1;
    int r = d->nccl->all_reduce(x, x, n, NCCL_FLOAT32, NCCL_SUM, d->nccl->comm, side);
    if (r != 0)
        return db_err_set(err, DB_EIO, "ncclAllReduce of %zu floats: %s", n, d->nccl->error_string(r));
    return 0;
}

int db_dist_wait(db_dist *d, db_ctx *c, db_err *err)
{
    if (!d->pending)
        return 0;
    d->pending = 0;
    if (c->cuda_api->side_join(c))
        return db_err_set(err, c->err.code, "%s", c->err.msg);
    return 0;
}

int db_dist_sum_dev(db_dist *d, db_ctx *c, float *x, size_t n, db_err *err)
{
    if (d->world == 1 || n == 0)
        return 0;
    if (c->device == DB_CPU)
        return db_dist_sum_f32(d, x, n, err);
    if (d->nccl) {
        int r = d->nccl->all_reduce(x, x, n, NCCL_FLOAT32, NCCL_SUM, d->nccl->comm, c->cuda_api->stream(c));
        if (r != 0)
            return db_err_set(err, DB_EIO, "ncclAllReduce of %zu floats: %s", n, d->nccl->error_string(r));
        return 0;
    }
    /* staged: through a host buffer in pieces of at most 64 Mi floats */
    const size_t piece = (size_t)1 << 26;
    const size_t want = n < piece ? n : piece;
    if (d->stage_n < want) {
        float *s = realloc(d->stage, want * sizeof *s);
        if (!s)
            return db_err_set(err, DB_ENOMEM, "out of memory for a %zu MiB staging buffer", (want * 4) >> 20);
        d->stage = s, d->stage_n = want;
    }
    for (size_t i = 0; i < n; i += want) {
        const size_t k = n - i < want ? n - i : want;
        if (db_ctx_copy(c, d->stage, x + i, k * sizeof *x, DB_COPY_D2H))
            return db_err_set(err, c->err.code, "%s", c->err.msg);
        if (db_dist_sum_f32(d, d->stage, k, err))
            return -1;
        if (db_ctx_copy(c, x + i, d->stage, k * sizeof *x, DB_COPY_H2D) || db_ctx_sync(c))
            return db_err_set(err, c->err.code, "%s", c->err.msg);
    }
    return 0;
}
