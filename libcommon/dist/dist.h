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

struct db_ctx;
struct db_nccl; /* dist.c: the dlopen'd NCCL and its communicator */

typedef struct db_dist {
    int rank, world;
    int mpi;                 /* 1: MPI initialised by us (finalise it) */
    /* gradient sums of a device ctx (db_dist_bind): NCCL, or host staging */
    struct db_nccl *nccl;    /* NULL: no NCCL communicator */
    float *stage;            /* host buffer for staged sums, stage_n floats */
    size_t stage_n;
    int pending;             /* NCCL sums queued on the side stream since the last db_dist_wait */
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

/* This process's index among the job's processes on its host, from the
 * launcher's environment (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID,
 * MPI_LOCALRANKID, PMI_LOCAL_RANK), else the rank: which GPU a process of
 * `mpirun -np G db-train --device cuda` takes (cuda:LOCAL_RANK). */
int db_dist_local_rank(const db_dist *d);

/* Make db_dist_sum_dev ready for buffers of c's device.  A CPU ctx or a job
 * of one process needs nothing.  A CUDA ctx in a job of several: NCCL
 * (libnccl.so.2, or the file DB_NCCL_LIB names), its communicator
 * bootstrapped by broadcasting rank 0's ncclUniqueId over MPI, collectives
 * queued on c's stream; DB_NCCL=0, or no loadable NCCL, sums through host
 * memory and MPI instead (correct, slower: one device-host round trip per
 * step).  Call after db_ctx_create and before the first sum; every rank
 * must call it. */
int db_dist_bind(db_dist *d, struct db_ctx *c, db_err *err);
/* "mpi" (host buffers), "nccl", or "mpi-staged" (device buffers through host). */
const char *db_dist_transport(const db_dist *d, const struct db_ctx *c);
/* In place over all ranks, like db_dist_sum_f32, for n floats that live on
 * c's device.  Every rank ends with the same bits (NCCL's ring reduces each
 * chunk once and broadcasts it; MPI as above), so the replicas' AdamW steps
 * stay identical. */
int db_dist_sum_dev(db_dist *d, struct db_ctx *c, float *x, size_t n, db_err *err);
/* The same, begun rather than finished: with NCCL the all-reduce is queued
 * on c's side stream after the work queued so far, so it runs while c's
 * stream goes on with the next ops (the rest of the backward); x must not be
 * read or written until db_dist_wait.  Without NCCL it is db_dist_sum_dev,
 * done on return.  Several may be begun before one wait (a bucket each). */
int db_dist_sum_dev_start(db_dist *d, struct db_ctx *c, float *x, size_t n, db_err *err);
/* c's stream waits for every sum begun (the ops queued next see the sums);
 * nothing to do when none is pending. */
int db_dist_wait(db_dist *d, struct db_ctx *c, db_err *err);

#endif
