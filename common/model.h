/* A decoder-only transformer checkpoint in the Hugging Face layout: config.json (Llama or
 * Qwen2) and safetensors weights, read in place (mapped) with per-layer views. */
#ifndef ES_MODEL_H
#define ES_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "safetensors.h"

typedef enum { ES_ARCH_LLAMA, ES_ARCH_QWEN2 } es_arch;

typedef struct es_model_config {
    es_arch arch;
    int vocab_size, hidden_size, intermediate_size, n_layers, n_heads, n_kv_heads, head_dim;
    int max_position_embeddings;
    double rms_norm_eps, rope_theta;
    int qkv_bias;   /* q/k/v projections have biases (Qwen2; Llama's attention_bias) */
    int o_bias;     /* o_proj has a bias (Llama's attention_bias) */
    int mlp_bias;   /* gate/up/down have biases (Llama's mlp_bias) */
    int tie_word_embeddings;
    /* "llama3" rope scaling (rope_scaling or rope_parameters) */
    int rope_llama3;
    double rope_factor, rope_low_freq_factor, rope_high_freq_factor;
    int rope_original_max_position;
} es_model_config;

/* Parses config.json (PATH: the file or the model folder). Unknown architectures or
 * unsupported options are ES_ERR_DATA naming the key; *text (when not NULL) receives the
 * file's text, malloc'd, for the record kept in output files. */
int es_model_config_load(const char *path, es_model_config *config, char **text, es_error *err);
/* The same from a config.json text held in memory (fuzzing, tests); `name` names it in messages.
 * Every value is checked by type and range: ES_ERR_DATA naming the file and the key. */
int es_model_config_parse(const char *text, size_t len, const char *name, es_model_config *config, es_error *err);

/* RoPE inverse frequencies (head_dim / 2 of them), in double, with llama3 scaling applied. */
void es_rope_inv_freq(const es_model_config *config, double *inv_freq);

/* One decoder layer's weights in device memory, in the backend's weight format (the CPU's is
 * fp32). The parts are also numbered (ES_PART_*), in the order of the layer's tensor table. */
/* Device memory, in the format of whoever filled it in: a layer stream's weights are in the
 * device's weight format (dev->weight_dtype: fp32 on the CPU, bf16 on CUDA); the training's
 * master weights, their gradients and moments are fp32 (kernels/weights.h). */
typedef struct es_layer_weights {
    void *input_norm;                        /* (C) */
    void *q, *k, *v, *o;                     /* (H*hd, C), (KV*hd, C), (KV*hd, C), (C, H*hd) */
    void *q_bias, *k_bias, *v_bias, *o_bias; /* (H*hd), (KV*hd), (KV*hd), (C) or NULL */
    void *post_norm;                         /* (C) */
    void *gate, *up, *down;                  /* (I, C), (I, C), (C, I) */
    void *gate_bias, *up_bias, *down_bias;   /* (I), (I), (C) or NULL */
} es_layer_weights;

enum { ES_LAYER_PARTS = 16 };
/* The slot of part p (0 <= p < ES_LAYER_PARTS) in w. */
void **es_layer_slot(es_layer_weights *w, int part);

/* A tensor a checkpoint holds: its Hugging Face name and shape (cols 0: a vector). */
typedef struct es_tensor_spec {
    char name[96];
    int ndim;
    int64_t shape[2];
    int is_norm;     /* an RMSNorm weight (a random checkpoint sets these to 1) */
    int layer, part; /* where it goes: a decoder layer's part, or -1 and the embedding/norm/head */
} es_tensor_spec;

/* The tensors of the first n_layers layers (and with the head, the final norm and lm_head
 * unless tied) in checkpoint order; `list` holds es_model_max_tensors(n_layers). Returns the count. */
int es_model_tensor_list(const es_model_config *config, int n_layers, int with_head, es_tensor_spec *list);
static inline int es_model_max_tensors(int n_layers) { return 16 * n_layers + 4; }

/* A checkpoint opened for reading: its tensors stay in their file dtype, mapped from the
 * safetensors files (the page cache's memory, not the process's), with per-layer views; a
 * backend brings in what it needs (kernels/stream.h, kernels/weights.h). Every tensor the
 * opened layers and head need is checked (present, shape, float dtype) at open. */
typedef struct es_layer_view {
    const es_tensor *part[ES_LAYER_PARTS];   /* NULL where the layer has no such tensor (biases) */
    size_t numel;                            /* elements of all its tensors */
} es_layer_view;

typedef struct es_model_store {
    es_model_config config;
    char *dir;
    es_weights *weights;
    const es_tensor *embed;                  /* (V, C) */
    es_layer_view *layers;                   /* [n_layers]: layers 1..n_layers */
    int n_layers;
    const es_tensor *final_norm, *lm_head;   /* NULL unless opened with the head; lm_head is embed when tied */
    es_tensor_spec *specs;                   /* [n_specs] every opened tensor, checkpoint order */
    const es_tensor **found;                 /* [n_specs] its tensor in the files */
    int n_specs;
} es_model_store;

/* Opens the first `n_layers` decoder layers (-1: all) and, with `with_head`, the final norm and
 * lm_head. Missing or mis-shaped tensors are ES_ERR_DATA naming the tensor and file. */
int es_model_open(const char *dir, int n_layers, int with_head, es_model_store *store, es_error *err);
void es_model_close(es_model_store *store);

#endif
