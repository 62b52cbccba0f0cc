/* Data parallelism: the all-reduce essence-align needs, behind one small interface. The ranks
 * are MPI's (mpirun -np N, or srun with PMI), or, started by srun without MPI, Slurm's
 * (SLURM_PROCID of SLURM_NTASKS). On a device with collectives (CUDA: NCCL) the ranks join a device
 * group, bootstrapped through MPI or through a file in --out named by the Slurm job and step
 * (align/group_file.h), and gradients are summed on the devices; otherwise (the CPU) through MPI
 * on the host. Without MPI or Slurm ranks, the world is this one process. */
#ifndef ES_ALIGN_COMM_H
#define ES_ALIGN_COMM_H

#include <stddef.h>

#include "backend.h"
#include "error.h"

typedef struct align_comm {
    int rank, world;
    int mpi;             /* MPI was initialised (and must be finalised) */
    es_device *group;    /* the device whose group the ranks joined, or NULL */
    es_device *staged;   /* or the device whose memory the collectives copy through the host (MPI) */
    float *bounce;       /* (bounce_n) host memory for those copies */
    size_t bounce_n;
    void *scratch;       /* (COMM_SCRATCH_BYTES) device memory: host values summed through the group */
    void *pending;       /* MPI's requests of the collectives started and not yet waited for */
    int n_pending, pending_cap;
} align_comm;

enum { COMM_SCRATCH_BYTES = 4096 };

int comm_init(align_comm *comm, int *argc, char ***argv, es_error *err);
/* With more than one rank: joins dev's group if it has collectives (dir: where the bootstrap file
 * goes without MPI; rank 0 creates it), else keeps MPI's host path; no MPI and no collectives is
 * ES_ERR_USAGE. Ranks under MPI that share one physical device (dev->where) take the host path
 * too: NCCL allows one rank per GPU. */
int comm_join_device(align_comm *comm, es_device *dev, const char *dir, es_error *err);
/* Lets go of what the group holds on the device (before the device closes). */
void comm_leave_device(align_comm *comm);
/* Sums n floats in device memory over the ranks in place (a joined group only). */
int comm_allreduce_device_f32(align_comm *comm, float *device_data, size_t n, es_error *err);
/* The collectives a step overlaps with its backward (align/reduce.h), on n floats of device
 * memory: through the joined group; on a device whose memory is the host's (the CPU) through
 * MPI's non-blocking calls; else copied to the host, through MPI, and back, before this returns. ALLREDUCE sums over the ranks in place, REDUCE sums into root's data (the others' is
 * left as it was or undefined), BROADCAST copies root's data to every rank. Every rank starts the
 * same calls in the same order; the data is complete (and may be touched) after comm_wait. */
int comm_start(align_comm *comm, es_group_call call, float *data, size_t n, int root, es_error *err);
int comm_wait(align_comm *comm, es_error *err);
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
