/* Data-parallel training across processes (DESIGN §7): the few collective
 * operations db-train needs, over MPI.  A process not started by an MPI
 * launcher (no OMPI_COMM_WORLD_SIZE / PMI_SIZE / PMIX_RANK in its
 * environment) never touches MPI and is rank 0 of 1, so the single-process
 * tool does not depend on a working MPI runtime.  Built without MPI
 * (DB_HAVE_MPI undefined) every process is rank 0 of 1 and a launch under
 * mpirun is refused. */
#ifndef DB_DIST_H
#define DB_DIST_H

#include <stddef.h>

#include "libcommon/core/err.h"

typedef struct db_dist {
    int rank, world;
    int mpi;                 /* 1: MPI initialised by us (finalise it) */
} db_dist;

/* Join the job (MPI_Init when launched by mpirun/srun). */
int db_dist_init(db_dist *d, int *argc, char ***argv, db_err *err);
void db_dist_finish(db_dist *d);
/* Abort every process of the job (after an error on one rank). */
void db_dist_abort(db_dist *d, int status);

/* In place, over all ranks: x[i] = sum of every rank's x[i].  n floats,
 * any size (sent in chunks).  The sum is reduced in rank order by MPI's
 * default algorithm for the job size, the same on every rank. */
int db_dist_sum_f32(db_dist *d, float *x, size_t n, db_err *err);
int db_dist_sum_f64(db_dist *d, double *x, size_t n, db_err *err);
/* x = the largest of every rank's x. */
int db_dist_max_int(db_dist *d, int *x, db_err *err);

#endif
