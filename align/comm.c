#include "comm.h"

#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "group_file.h"
#include "log.h"

#ifdef ES_HAVE_MPI
#include <mpi.h>
#endif

int comm_init(align_comm *comm, int *argc, char ***argv, es_error *err) {
    memset(comm, 0, sizeof *comm);
    comm->rank = 0, comm->world = 1;
#ifdef ES_HAVE_MPI
    /* Only under a launcher: a plain run stays a plain process (no MPI start-up cost). */
    if (getenv("OMPI_COMM_WORLD_SIZE") || getenv("PMI_SIZE") || getenv("PMIX_RANK")) {
        if (MPI_Init(argc, argv) != MPI_SUCCESS) return es_fail(err, ES_ERR_RUNTIME, "MPI_Init failed");
        MPI_Comm_rank(MPI_COMM_WORLD, &comm->rank);
        MPI_Comm_size(MPI_COMM_WORLD, &comm->world);
        comm->mpi = 1;
    }
#else
    (void)argc, (void)argv;
    if (getenv("OMPI_COMM_WORLD_SIZE") && atoi(getenv("OMPI_COMM_WORLD_SIZE")) > 1)
        return es_fail(err, ES_ERR_USAGE, "started by mpirun, but this build has no MPI (install libopenmpi-dev and rebuild)");
#endif
    /* srun without MPI: Slurm's ranks; they sum through a device group (comm_join_device) */
    const char *procid = getenv("SLURM_PROCID"), *ntasks = getenv("SLURM_NTASKS");
    if (!comm->mpi && procid && ntasks && atoi(ntasks) > 1) {
        comm->rank = atoi(procid), comm->world = atoi(ntasks);
        if (comm->rank < 0 || comm->rank >= comm->world)
            return es_fail(err, ES_ERR_USAGE, "SLURM_PROCID %s is not a rank of SLURM_NTASKS %s", procid, ntasks);
    }
    return ES_OK;
}

/* Rank 0's group id to every rank: MPI's broadcast, or the bootstrap file. */
static int share_id(align_comm *comm, unsigned char *id, const char *dir, es_error *err) {
#ifdef ES_HAVE_MPI
    if (comm->mpi) {
        if (MPI_Bcast(id, ES_GROUP_ID_BYTES, MPI_BYTE, 0, MPI_COMM_WORLD) != MPI_SUCCESS)
            return es_fail(err, ES_ERR_RUNTIME, "MPI_Bcast of the device group's id failed");
        return ES_OK;
    }
#endif
    const char *job = getenv("SLURM_JOB_ID"), *step = getenv("SLURM_STEP_ID");
    if (!job) return es_fail(err, ES_ERR_USAGE, "%d ranks without MPI and without SLURM_JOB_ID: no way to share the group's id", comm->world);
    if (comm->rank == 0 && mkdir(dir, 0777) && errno != EEXIST) return es_fail(err, ES_ERR_RUNTIME, "%s: %s", dir, strerror(errno));
    return group_file_share(dir, job, step ? step : "0", comm->rank, id, ES_GROUP_ID_BYTES, 600.0, err);
}

/* Whether two ranks run on one physical device (the same host and dev->where): every rank gets
 * the same answer. */
static int ranks_share_device(align_comm *comm, const es_device *dev, int *shared, es_error *err) {
    *shared = 0;
#ifdef ES_HAVE_MPI
    enum { PLACE = 320 };
    char mine[PLACE] = {0};
    char host[256] = "";
    gethostname(host, sizeof host - 1);
    snprintf(mine, sizeof mine, "%s %s", host, dev->where);
    char *all = calloc((size_t)comm->world, PLACE);
    if (!all) return es_fail(err, ES_ERR_RUNTIME, "out of memory");
    if (MPI_Allgather(mine, PLACE, MPI_CHAR, all, PLACE, MPI_CHAR, MPI_COMM_WORLD) != MPI_SUCCESS) {
        free(all);
        return es_fail(err, ES_ERR_RUNTIME, "MPI_Allgather of the ranks' devices failed");
    }
    for (int a = 0; a < comm->world && !*shared; a++)
        for (int b = a + 1; b < comm->world && !*shared; b++)
            if (!strncmp(all + (size_t)a * PLACE, all + (size_t)b * PLACE, PLACE)) {
                *shared = 1;
                if (comm->rank == 0)
                    es_log("ranks %d and %d share %s (%s): NCCL takes one rank per GPU, so the ranks sum through MPI on the host", a, b,
                           dev->name, dev->where);
            }
    free(all);
#else
    (void)comm, (void)dev, (void)err;
#endif
    return ES_OK;
}

int comm_join_device(align_comm *comm, es_device *dev, const char *dir, es_error *err) {
    if (comm->world == 1) return ES_OK;
    int shared = 0;
    if (comm->mpi && dev->where[0] && ranks_share_device(comm, dev, &shared, err)) return err->code;
    if (!es_device_has_group(dev) || shared) {
        if (!comm->mpi)
            return es_fail(err, ES_ERR_USAGE, "%d ranks started without MPI need a device with collectives (--device cuda); on %s, "
                           "start them with mpirun or srun --mpi=pmix", comm->world, dev->name);
        if (!dev->host_memory) comm->staged = dev; /* the host path, through copies */
        return ES_OK;
    }
    unsigned char id[ES_GROUP_ID_BYTES] = {0};
    int rc = comm->rank == 0 ? es_device_group_id(dev, id, err) : ES_OK;
    if (!rc) rc = share_id(comm, id, dir, err);
    if (!rc) rc = es_device_group_join(dev, id, comm->rank, comm->world, err);
    if (!rc) rc = es_device_alloc(dev, COMM_SCRATCH_BYTES, &comm->scratch, "the all-reduce's scratch", err);
    if (rc) return rc;
    comm->group = dev;
    /* every rank has joined once this returns: the bootstrap file has done its work */
    comm_barrier(comm);
    if (!comm->mpi && comm->rank == 0)
        group_file_remove(dir, getenv("SLURM_JOB_ID"), getenv("SLURM_STEP_ID") ? getenv("SLURM_STEP_ID") : "0");
    return ES_OK;
}

int comm_allreduce_device_f32(align_comm *comm, float *device_data, size_t n, es_error *err) {
    if (!comm->group) return es_fail(err, ES_ERR_RUNTIME, "an all-reduce on the device without a device group");
    return es_device_group_allreduce(comm->group, device_data, n, ES_GROUP_SUM_F32, err);
}

/* Host values combined through the device group (ranks without MPI): up, combined, down. */
static int through_group(align_comm *comm, void *data, size_t bytes, size_t n, es_group_op op, es_error *err) {
    for (size_t done = 0; done < bytes;) {
        const size_t part = bytes - done < COMM_SCRATCH_BYTES ? bytes - done : COMM_SCRATCH_BYTES;
        int rc = es_device_upload(comm->group, comm->scratch, (char *)data + done, part, err);
        if (!rc) rc = es_device_group_allreduce(comm->group, comm->scratch, part / (bytes / n), op, err);
        if (!rc) rc = es_device_download(comm->group, (char *)data + done, comm->scratch, part, err);
        if (rc) return rc;
        done += part;
    }
    return ES_OK;
}

#ifdef ES_HAVE_MPI
static int mpi_start(align_comm *comm, es_group_call call, float *data, size_t n, int root, es_error *err) {
    for (size_t done = 0; done < n;) { /* MPI counts are ints: large ranges go in slices */
        const int count = n - done > (size_t)INT_MAX ? INT_MAX : (int)(n - done);
        if (comm->n_pending == comm->pending_cap) {
            const int cap = comm->pending_cap ? 2 * comm->pending_cap : 64;
            MPI_Request *grown = realloc(comm->pending, (size_t)cap * sizeof *grown);
            if (!grown) return es_fail(err, ES_ERR_RUNTIME, "out of memory for MPI's requests");
            comm->pending = grown, comm->pending_cap = cap;
        }
        MPI_Request *request = (MPI_Request *)comm->pending + comm->n_pending;
        float *at = data + done;
        const int me = comm->rank == root;
        int rc = call == ES_GROUP_ALLREDUCE ? MPI_Iallreduce(MPI_IN_PLACE, at, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD, request)
                 : call == ES_GROUP_REDUCE  ? MPI_Ireduce(me ? MPI_IN_PLACE : at, me ? at : NULL, count, MPI_FLOAT, MPI_SUM, root,
                                                          MPI_COMM_WORLD, request)
                                            : MPI_Ibcast(at, count, MPI_FLOAT, root, MPI_COMM_WORLD, request);
        if (rc != MPI_SUCCESS) return es_fail(err, ES_ERR_RUNTIME, "a non-blocking MPI collective of %zu floats failed to start", n);
        comm->n_pending++;
        done += (size_t)count;
    }
    /* Open MPI moves non-blocking collectives on inside its calls: a nudge each time */
    int ignored;
    MPI_Testall(comm->n_pending, comm->pending, &ignored, MPI_STATUSES_IGNORE);
    return ES_OK;
}
#endif

#ifdef ES_HAVE_MPI
/* A collective on device memory through the host: down, MPI's blocking call, up, in pieces that
 * bound the host buffer (each rank moves only what it sends or keeps). */
static int staged_call(align_comm *comm, es_group_call call, float *data, size_t n, int root, es_error *err) {
    enum { PIECE_FLOATS = 16 << 20 };
    const size_t want = n < PIECE_FLOATS ? n : PIECE_FLOATS;
    if (comm->bounce_n < want) {
        float *grown = realloc(comm->bounce, want * sizeof *grown);
        if (!grown) return es_fail(err, ES_ERR_RUNTIME, "out of host memory for the collectives' copies (%zu floats)", want);
        comm->bounce = grown, comm->bounce_n = want;
    }
    const int me = comm->rank == root;
    const int sends = call != ES_GROUP_BROADCAST || me, keeps = call == ES_GROUP_ALLREDUCE || (call == ES_GROUP_REDUCE) == me;
    for (size_t done = 0; done < n; done += want) {
        const size_t part = n - done < want ? n - done : want;
        const size_t bytes = part * sizeof(float);
        float *at = data + done;
        if (sends && es_device_download(comm->staged, comm->bounce, at, bytes, err)) return err->code;
        int rc = call == ES_GROUP_ALLREDUCE ? MPI_Allreduce(MPI_IN_PLACE, comm->bounce, (int)part, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD)
                 : call == ES_GROUP_REDUCE  ? MPI_Reduce(me ? MPI_IN_PLACE : comm->bounce, me ? comm->bounce : NULL, (int)part, MPI_FLOAT,
                                                         MPI_SUM, root, MPI_COMM_WORLD)
                                            : MPI_Bcast(comm->bounce, (int)part, MPI_FLOAT, root, MPI_COMM_WORLD);
        if (rc != MPI_SUCCESS) return es_fail(err, ES_ERR_RUNTIME, "an MPI collective of %zu floats failed", part);
        if (keeps && es_device_upload(comm->staged, at, comm->bounce, bytes, err)) return err->code;
    }
    return ES_OK;
}
#endif

int comm_start(align_comm *comm, es_group_call call, float *data, size_t n, int root, es_error *err) {
    if (comm->world == 1 || n == 0) return ES_OK;
    if (comm->group) return es_device_group_start(comm->group, call, data, n, root, err);
#ifdef ES_HAVE_MPI
    if (comm->staged) return staged_call(comm, call, data, n, root, err);
    if (comm->mpi) return mpi_start(comm, call, data, n, root, err);
#endif
    (void)data, (void)call, (void)root;
    return es_fail(err, ES_ERR_RUNTIME, "a collective over %d ranks without MPI or a device group", comm->world);
}

int comm_wait(align_comm *comm, es_error *err) {
    if (comm->world == 1) return ES_OK;
    if (comm->group) return es_device_group_wait(comm->group, err);
#ifdef ES_HAVE_MPI
    if (comm->n_pending) {
        const int n = comm->n_pending;
        comm->n_pending = 0;
        if (MPI_Waitall(n, comm->pending, MPI_STATUSES_IGNORE) != MPI_SUCCESS)
            return es_fail(err, ES_ERR_RUNTIME, "%d non-blocking MPI collectives failed", n);
    }
#endif
    (void)err;
    return ES_OK;
}

int comm_allreduce_f32(align_comm *comm, float *data, size_t n, es_error *err) {
#ifdef ES_HAVE_MPI
    /* MPI counts are ints: large arenas go in slices. */
    for (size_t done = 0; comm->mpi && comm->world > 1 && done < n;) {
        int count = n - done > (size_t)INT_MAX ? INT_MAX : (int)(n - done);
        if (MPI_Allreduce(MPI_IN_PLACE, data + done, count, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS)
            return es_fail(err, ES_ERR_RUNTIME, "MPI_Allreduce of %zu floats failed", n);
        done += (size_t)count;
    }
#else
    (void)comm, (void)data, (void)n, (void)err;
#endif
    return ES_OK;
}

int comm_allreduce_f64(align_comm *comm, double *data, size_t n, es_error *err) {
    if (comm->world > 1 && !comm->mpi && comm->group) return through_group(comm, data, n * sizeof *data, n, ES_GROUP_SUM_F64, err);
#ifdef ES_HAVE_MPI
    if (comm->mpi && comm->world > 1 &&
        MPI_Allreduce(MPI_IN_PLACE, data, (int)n, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD) != MPI_SUCCESS)
        return es_fail(err, ES_ERR_RUNTIME, "MPI_Allreduce of %zu doubles failed", n);
#else
    (void)comm, (void)data, (void)n, (void)err;
#endif
    return ES_OK;
}

int comm_max_int(align_comm *comm, int value) {
    if (comm->world > 1 && !comm->mpi && comm->group) {
        int32_t combined = value;
        es_error ignored = {0};
        /* a failed collective counts as a failure on some rank */
        return through_group(comm, &combined, sizeof combined, 1, ES_GROUP_MAX_I32, &ignored) ? (value ? value : ES_ERR_RUNTIME)
                                                                                              : (int)combined;
    }
#ifdef ES_HAVE_MPI
    int result = value;
    if (comm->mpi && comm->world > 1) MPI_Allreduce(&value, &result, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return result;
#else
    (void)comm;
    return value;
#endif
}

void comm_barrier(align_comm *comm) {
    if (comm->world > 1 && !comm->mpi && comm->group) {
        (void)comm_max_int(comm, 0);
        return;
    }
#ifdef ES_HAVE_MPI
    if (comm->mpi && comm->world > 1) MPI_Barrier(MPI_COMM_WORLD);
#else
    (void)comm;
#endif
}

void comm_leave_device(align_comm *comm) {
    if (comm->group && comm->scratch) es_device_free(comm->group, comm->scratch, COMM_SCRATCH_BYTES);
    comm->group = NULL, comm->scratch = NULL, comm->staged = NULL;
}

void comm_finalize(align_comm *comm) {
    free(comm->pending), free(comm->bounce);
    comm->pending = NULL, comm->n_pending = comm->pending_cap = 0, comm->bounce = NULL, comm->bounce_n = 0;
#ifdef ES_HAVE_MPI
    if (comm->mpi) MPI_Finalize();
#endif
    comm->mpi = 0;
}

void comm_abort(align_comm *comm, int code) {
#ifdef ES_HAVE_MPI
    if (comm->mpi && comm->world > 1) MPI_Abort(MPI_COMM_WORLD, code);
#else
    (void)comm;
#endif
    exit(code);
}
