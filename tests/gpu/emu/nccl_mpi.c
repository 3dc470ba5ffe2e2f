/* A stand-in for NCCL in the CUDA emulator (tests/gpu/emu): the five entry
 * points libcommon/dist/dist.c loads from libnccl.so.2 (DB_NCCL_LIB names
 * this library instead), with nccl.h's very prototypes, done over MPI.  In
 * the emulator "device" memory is host memory and every stream's work is
 * done when it is queued, so an all-reduce can be an MPI_Allreduce on the
 * buffers themselves at the call.  It is the multi-GPU path's test without
 * GPUs (tests/gpu/test_dist.c under mpirun): dist.c's hand-declared ABI
 * (id size, type and operator codes) is checked against nccl.h here when
 * this compiles; the id's broadcast, the communicator's rank and size, the
 * counts and pointers of every sum, at run time.
 *
 * What it checks at run time, each failure an NCCL error code:
 *   ncclCommInitRank: nranks and rank are MPI_COMM_WORLD's, and every rank
 *     was given the id rank 0's ncclGetUniqueId made (it holds rank 0's pid
 *     and a serial: dist.c broadcasts it);
 *   ncclAllReduce: float32, sum, a communicator of ours, and a count that
 *     every rank passes alike (a rank summing another slice than its peers
 *     would hang or mix sums on real NCCL).
 * Environment (for the test's own checks):
 *   EMU_NCCL_LOG=PREFIX: each rank appends "allreduce COUNT STREAM" per sum
 *     to PREFIX.RANK (STREAM: the stream's handle, so a test can tell the
 *     ctx's stream from its side stream);
 *   EMU_NCCL_FAIL=K: the K-th all-reduce (from 1) returns ncclInternalError;
 *   EMU_NCCL_DROP=K: the K-th all-reduce returns success having summed
 *     nothing (a mutant: the test must fail). */
#include <mpi.h>
#include <nccl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* what dist.c declares without nccl.h */
_Static_assert(sizeof(ncclUniqueId) == 128, "dist.c: NCCL_ID_BYTES 128");
_Static_assert(ncclFloat32 == 7, "dist.c: NCCL_FLOAT32 7");
_Static_assert(ncclSum == 0, "dist.c: NCCL_SUM 0");
_Static_assert(ncclSuccess == 0, "dist.c: 0 is success");

struct ncclComm {
    int magic, nranks, rank;
    long calls;
};
enum { COMM_MAGIC = 0x6e63636c };
static const char ID_TAG[] = "emu-nccl id";

static long env_long(const char *name)
{
    const char *v = getenv(name);
    return v && *v ? strtol(v, NULL, 10) : 0;
}

const char *ncclGetErrorString(ncclResult_t r)
{
    switch (r) {
    case ncclSuccess:
        return "no error";
    case ncclInvalidArgument:
        return "invalid argument (emulator's NCCL)";
    case ncclInvalidUsage:
        return "invalid usage (emulator's NCCL)";
    case ncclSystemError:
        return "system error (emulator's NCCL: MPI failed)";
    default:
        return "internal error (emulator's NCCL)";
    }
}

ncclResult_t ncclGetUniqueId(ncclUniqueId *id)
{
    static long serial; /* (a test library's counter: which id this is) */
    memset(id, 0, sizeof *id);
    snprintf(id->internal, sizeof id->internal, "%s %ld %ld", ID_TAG, (long)getpid(), ++serial);
    return ncclSuccess;
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank)
{
    int init = 0, size = 0, me = -1;
    if (MPI_Initialized(&init) != MPI_SUCCESS || !init || MPI_Comm_size(MPI_COMM_WORLD, &size) != MPI_SUCCESS ||
        MPI_Comm_rank(MPI_COMM_WORLD, &me) != MPI_SUCCESS)
        return ncclSystemError;
    /* every rank holds rank 0's id: rank 0's copy sent to all and compared */
    ncclUniqueId root = id;
    if (MPI_Bcast(&root, sizeof root, MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
        return ncclSystemError;
    int bad = nranks != size || rank != me || memcmp(&root, &id, sizeof id) != 0 ||
              strncmp(id.internal, ID_TAG, sizeof ID_TAG - 1) != 0;
    if (MPI_Allreduce(MPI_IN_PLACE, &bad, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD) != MPI_SUCCESS)
        return ncclSystemError;
    if (bad)
        return ncclInvalidArgument;
    struct ncclComm *c = calloc(1, sizeof *c);
    if (!c)
        return ncclSystemError;
    c->magic = COMM_MAGIC, c->nranks = nranks, c->rank = rank;
    *comm = c;
    return ncclSuccess;
}

ncclResult_t ncclCommDestroy(ncclComm_t comm)
{
    if (!comm || comm->magic != COMM_MAGIC)
        return ncclInvalidArgument;
    comm->magic = 0;
    free(comm);
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *sendbuff, void *recvbuff, size_t count, ncclDataType_t datatype,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream)
{
    if (!comm || comm->magic != COMM_MAGIC || datatype != ncclFloat32 || op != ncclSum)
        return ncclInvalidArgument;
    const long k = ++comm->calls;
    const char *log = getenv("EMU_NCCL_LOG");
    if (log && *log) {
        char path[4096];
        snprintf(path, sizeof path, "%s.%d", log, comm->rank);
        FILE *f = fopen(path, "a");
        if (!f)
            return ncclSystemError;
        fprintf(f, "allreduce %zu %p\n", count, (void *)stream);
        fclose(f);
    }
    /* every rank the same count (MPI would mix two sizes' sums silently) */
    unsigned long long lo = count, hi = count;
    if (MPI_Allreduce(MPI_IN_PLACE, &lo, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, MPI_COMM_WORLD) != MPI_SUCCESS ||
        MPI_Allreduce(MPI_IN_PLACE, &hi, 1, MPI_UNSIGNED_LONG_LONG, MPI_MAX, MPI_COMM_WORLD) != MPI_SUCCESS)
        return ncclSystemError;
    if (lo != hi)
        return ncclInvalidUsage;
    if (k == env_long("EMU_NCCL_FAIL"))
        return ncclInternalError;
    if (k == env_long("EMU_NCCL_DROP"))
        return ncclSuccess;
    if (sendbuff != recvbuff)
        memcpy(recvbuff, sendbuff, count * sizeof(float));
    /* in pieces MPI's int count can hold */
    for (size_t i = 0; i < count;) {
        const size_t piece = count - i < ((size_t)1 << 30) ? count - i : ((size_t)1 << 30);
        if (MPI_Allreduce(MPI_IN_PLACE, (float *)recvbuff + i, (int)piece, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD) !=
            MPI_SUCCESS)
            return ncclSystemError;
        i += piece;
    }
    return ncclSuccess;
}
