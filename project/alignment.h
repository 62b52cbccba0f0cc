/* Token alignment of essence-project (DESIGN.md "Token alignment"; docs/project.md): which
 * teacher token each student token reads its target from. */
#ifndef ES_PROJECT_ALIGNMENT_H
#define ES_PROJECT_ALIGNMENT_H

#include <stdint.h>

typedef enum { ALIGN_EXACT, ALIGN_CAUSAL } align_rule;

/* For each student token of one sample, the aligned teacher token (an index into the
 * teacher's tokens of the same sample) or -1:
 *   exact:  the last teacher token with byte_end == the student's byte_end, both spans non-empty;
 *   causal: the last teacher token with byte_end <= the student's byte_end (the teacher has
 *           read no more text than the student).
 * Returns 0, or -1 when out of memory. */
int align_tokens(int64_t *teacher_row,                       // (n_student)
                  const int32_t *student_start, const int32_t *student_end, int n_student,
                  const int32_t *teacher_start, const int32_t *teacher_end, int n_teacher, align_rule rule);

#endif
