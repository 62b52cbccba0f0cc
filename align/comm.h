/* Data parallelism: the all-reduce essence-align needs, behind one small interface that the
 * CPU build implements with MPI (mpirun -np N) and the GPU build will implement with NCCL.
 * Without MPI at build time, or when not started by mpirun, the world is this one process. */
#ifndef ES_ALIGN_COMM_H
#define ES_ALIGN_COMM_H

#include <stddef.h>

#include "error.h"

typedef struct align_comm {
    int rank, world;
    int mpi;             /* MPI was initialised (and must be finalised) */
} align_comm;

int comm_init(align_comm *comm, int *argc, char ***argv, es_error *err);
/* Element-wise sums over every rank, in place; the result is identical on every rank. */
int comm_allreduce_f32(align_comm *comm, float *data, size_t n, es_error *err);
int comm_allreduce_f64(align_comm *comm, double *data, size_t n, es_error *err);
/* Every rank agrees (e.g. that a checkpoint is written): the largest of `value` over ranks. */
int comm_max_int(align_comm *comm, int value);
void comm_barrier(align_comm *comm);
void comm_finalize(align_comm *comm);
/* Stops every rank (an error on one rank must not leave the others waiting). */
void comm_abort(align_comm *comm, int code);

#endif
