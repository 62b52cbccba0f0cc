/* The id of a device group handed from rank 0 to the others through a file, for ranks that srun
 * starts without MPI: rank 0 writes DIR/.essence-group-JOB.STEP.partial, syncs it and renames it;
 * the others wait for the renamed file (never the partial one) and read it. JOB and STEP are
 * Slurm's job and step ids, so another job's or step's file is never read. */
#ifndef ES_ALIGN_GROUP_FILE_H
#define ES_ALIGN_GROUP_FILE_H

#include <stddef.h>

#include "error.h"

/* rank 0: writes id (size bytes); others: waits up to timeout_s for it and reads it into id. */
int group_file_share(const char *dir, const char *job, const char *step, int rank, unsigned char *id, size_t size, double timeout_s,
                     es_error *err);
/* rank 0, once every rank has joined: removes the file. */
void group_file_remove(const char *dir, const char *job, const char *step);

#endif
