/* essence-inspect for safetensors: a .safetensors file or a model folder (sharded or not). */
#ifndef ES_INSPECT_SAFETENSORS_H
#define ES_INSPECT_SAFETENSORS_H

#include "error.h"

/* Prints one line per tensor, in name order: NAME  DTYPE  [d0, d1]  FILE (the file's base
 * name, aligned in columns), then "total: N tensors, P parameters, B bytes in F files".
 * A bad file is ES_ERR_DATA; the caller prints err->msg and exits with err->code. */
int inspect_safetensors(const char *path, es_error *err);

#endif
