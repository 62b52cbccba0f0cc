#include "alignment.h"

#include <stdlib.h>

/* (end, index) pairs of non-empty teacher tokens, ordered by end then index. */
typedef struct end_index {
    int32_t end;
    int32_t index;
} end_index;

static int by_end_then_index(const void *a, const void *b) {
    const end_index *x = a, *y = b;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->index < y->index ? -1 : x->index > y->index;
}

/* The rules are applied literally ("the last teacher token with ..."), so they hold whatever
 * the order of the spans (an EOS appended with an empty span ends before the text does). */
int align_tokens(int64_t *teacher_row, const int32_t *student_start, const int32_t *student_end, int n_student,
                 const int32_t *teacher_start, const int32_t *teacher_end, int n_teacher, align_rule rule) {
    if (rule == ALIGN_CAUSAL) {
        /* suffix_min[j] = min(end[j..]) never decreases, and the last j with
         * suffix_min[j] <= e is the last teacher token ending at or before e. */
        int32_t *suffix_min = malloc((size_t)(n_teacher ? n_teacher : 1) * sizeof *suffix_min);
        if (!suffix_min) return -1;
        for (int j = n_teacher - 1; j >= 0; j--)
            suffix_min[j] = j + 1 < n_teacher && suffix_min[j + 1] < teacher_end[j] ? suffix_min[j + 1] : teacher_end[j];
        for (int i = 0; i < n_student; i++) {
            int low = 0, high = n_teacher; /* first j with suffix_min[j] > e */
            while (low < high) {
                int mid = low + (high - low) / 2;
                if (suffix_min[mid] <= student_end[i]) low = mid + 1;
                else high = mid;
            }
            teacher_row[i] = low - 1;
        }
        free(suffix_min);
        return 0;
    }
    end_index *ends = malloc((size_t)(n_teacher ? n_teacher : 1) * sizeof *ends);
    if (!ends) return -1;
    int n = 0;
    for (int j = 0; j < n_teacher; j++)
        if (teacher_end[j] > teacher_start[j]) ends[n++] = (end_index){teacher_end[j], j};
    qsort(ends, (size_t)n, sizeof *ends, by_end_then_index);
    for (int i = 0; i < n_student; i++) {
        teacher_row[i] = -1;
        if (student_end[i] <= student_start[i]) continue;
        int low = 0, high = n; /* first entry with end > e */
        while (low < high) {
            int mid = low + (high - low) / 2;
            if (ends[mid].end <= student_end[i]) low = mid + 1;
            else high = mid;
        }
        if (low > 0 && ends[low - 1].end == student_end[i]) teacher_row[i] = ends[low - 1].index;
    }
    free(ends);
    return 0;
}
