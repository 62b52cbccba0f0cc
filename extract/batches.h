/* essence-extract's batches: each batch goes forward through the teacher on the device, its
 * stored layers come back to the host, are checked and stored (teacher.h), then committed.
 *
 * The stored layers come back while the later layers compute (es_device_download_begin). On a
 * device whose memory is not the host's (CUDA) the checks and the storing — compression on the
 * pool and HDF5 — run on a writer thread of its own while the next batch computes on the GPU;
 * one batch is stored at a time and commits keep their order, so the file is the same as when
 * stored in line (a batch with a non-finite value is refused there, after the ones before it were
 * committed, as in line). On the CPU the pool computes the forward, so storing stays in line. */
#ifndef ES_EXTRACT_BATCHES_H
#define ES_EXTRACT_BATCHES_H

#include "backend.h"
#include "decoder.h"
#include "inputs.h"
#include "model.h"
#include "stream.h"
#include "teacher.h"

/* The teacher on its device: the checkpoint, the decoder's activations and the layer stream. */
typedef struct teacher_model {
    es_device *dev;
    es_model_store store;
    es_decoder *decoder;
    es_layer_stream *layers;
    int deepest;
} teacher_model;

/* Whole samples under the token budget, owned by the batch until it is run. */
typedef struct extract_batch {
    extract_sample *samples;
    int n, cap;
    int tokens;
} extract_batch;

typedef struct extract_batches extract_batches;

/* The stored layers (sorted), the teacher's width and the most tokens a batch holds; data and
 * model_dir name the inputs in messages. Nothing is copied: every pointer must outlive the
 * batches. */
int extract_batches_start(extract_batches **out, teacher_model *teacher, teacher_writer *writer, const int *layers, int n_layers,
                          int width, int capacity, const char *data, const char *model_dir, es_error *err);
/* Adds a sample (taking it over); 0 or an error (then the sample is freed). */
int extract_batch_add(extract_batch *b, extract_sample *sample, es_error *err);
/* Runs b (which comes back empty): the forward now; storing and the commit now, or on the writer
 * thread (an error of a batch stored there shows at the next call or at finish). */
int extract_batches_run(extract_batches *batches, extract_batch *b, es_error *err);
/* Waits for the writer, logs where the time went, and frees everything. Returns the first error
 * of any batch (ES_OK when all were committed). */
int extract_batches_finish(extract_batches *batches, int rc, es_error *err);

void extract_batch_free(extract_batch *b);

#endif
