/* Test tool: the golden training batch of tiny-qwen2 as a student.h5.
 *   golden_student GOLDEN_TRAIN_STEP.safetensors OUT.h5 [COPIES [nan]]
 * Sample s (s = 0, 1; repeated COPIES times, default 1) holds input_ids[s] as its tokens,
 * target[s] as /targets/layer_002 (bf16) where mask[s] is 1, and teacher_row -1 elsewhere:
 * essence-align on it with --seq-len 24 reproduces the golden step. With "nan", the first
 * aligned target of sample 1 holds a NaN (bad input for the tests). Copies after the first get
 * their targets jittered (deterministic noise of ±1%), so COPIES times the data makes a file
 * about COPIES times larger, not a file that compresses to the same size. */
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <stdlib.h>

#include "log.h"
#include "safetensors.h"
#include "student.h"

int main(int argc, char **argv) {
    es_set_program("golden_student");
    if (argc < 3 || argc > 5) {
        fprintf(stderr, "usage: golden_student GOLDEN.safetensors OUT.h5 [COPIES [nan]]\n");
        return ES_ERR_USAGE;
    }
    int copies = argc >= 4 ? atoi(argv[3]) : 1, poison = argc == 5 && !strcmp(argv[4], "nan");
    es_error err = {0};
    es_safetensors *golden;
    if (es_safetensors_open(argv[1], &golden, &err)) es_exit_error(&err);
    const es_tensor *ids = es_safetensors_find(golden, "input_ids"), *target = es_safetensors_find(golden, "target"),
                    *mask = es_safetensors_find(golden, "mask");
    if (!ids || !target || !mask || ids->ndim != 2 || target->ndim != 3) {
        fprintf(stderr, "golden_student: %s lacks input_ids, target or mask\n", argv[1]);
        return ES_ERR_DATA;
    }
    const int B = (int)ids->shape[0], L = (int)ids->shape[1], D = (int)target->shape[2], layer = 2;
    student_writer writer;
    if (student_create(&writer, argv[2], &layer, 1, D, NULL, &err)) es_exit_error(&err);
    int32_t *token_ids = malloc(sizeof(int32_t) * L), (*spans)[2] = calloc((size_t)L, sizeof *spans);
    int64_t *rows = malloc(sizeof(int64_t) * L);
    float *targets = malloc(sizeof(float) * L * D);
    uint64_t noise = 1;
    for (int copy = 0; copy < copies; copy++)
        for (int s = 0; s < B; s++) {
            for (int t = 0; t < L; t++) {
                token_ids[t] = (int32_t)((const int64_t *)ids->data)[s * L + t];
                int aligned = ((const float *)mask->data)[s * L + t] != 0;
                rows[t] = aligned ? s * L + t : -1;
                for (int k = 0; k < D; k++)
                    targets[t * D + k] = aligned ? ((const float *)target->data)[((size_t)s * L + t) * D + k] : 0.0f;
            for (int k = 0; copy > 0 && k < L * D; k++) {
                noise = noise * 6364136223846793005ull + 1442695040888963407ull;
                targets[k] *= 1.0f + 0.02f * ((float)(noise >> 40) / 16777216.0f - 0.5f);
            }
            }
            for (int t = 0; poison && s == 1 && copy == 0 && t < L; t++)
                if (rows[t] >= 0) {
                    targets[t * D] = NAN;
                    break;
                }
            char id[32];
            snprintf(id, sizeof id, "seq%d", s);
            if (student_add_sample(&writer, id, "", 0, 0, 0, token_ids, (const int32_t(*)[2])spans, rows, L, &err) ||
                student_add_targets(&writer, 0, targets, L, &err))
                es_exit_error(&err);
        }
    student_attribute attributes[] = {{"layer_map", 's', "2:2", 0, 0}};
    if (student_finish(&writer, attributes, 1, &err)) es_exit_error(&err);
    free(token_ids), free(spans), free(rows), free(targets);
    es_safetensors_close(golden);
    return 0;
}
