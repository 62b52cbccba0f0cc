#include "comm.h"

#include <limits.h>
#include <stdlib.h>

#ifdef ES_HAVE_MPI
#include <mpi.h>
#endif

int comm_init(align_comm *comm, int *argc, char ***argv, es_error *err) {
    comm->rank = 0, comm->world = 1, comm->mpi = 0;
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
#ifdef ES_HAVE_MPI
    if (comm->mpi && comm->world > 1) MPI_Barrier(MPI_COMM_WORLD);
#else
    (void)comm;
#endif
}

void comm_finalize(align_comm *comm) {
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
