/* MPI glue for data-parallel training (see dist.h). */
#include "dist.h"

#include <stdlib.h>

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

void db_dist_finish(db_dist *d)
{
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
