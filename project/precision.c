#include "precision.h"

#include <math.h>
#include <string.h>

static const char *const names[] = {"fp32", "tf32", "bf16", "fp8"};

int precision_parse(const char *name, es_precision *out) {
    for (int i = 0; i < 4; i++)
        if (!strcmp(name, names[i])) {
            *out = (es_precision)i;
            return 0;
        }
    return -1;
}

const char *precision_name(es_precision precision) { return names[precision]; }

/* DESIGN.md: relative error of the features by σ (rows) and precision (columns). */
static const double table_sigma[4] = {1, 3, 10, 30};
static const double table_error[4][4] = {
    {0, 0.0003, 0.003, 0.037}, {0, 0.0009, 0.009, 0.11}, {0, 0.003, 0.029, 0.37}, {1e-5, 0.009, 0.086, 0.97}};

double precision_predicted_error(es_precision precision, double sigma) {
    int p = (int)precision;
    double error;
    if (sigma <= table_sigma[0]) {
        error = table_error[0][p] * sigma / table_sigma[0];
    } else if (sigma >= table_sigma[3]) {
        error = table_error[3][p] * sigma / table_sigma[3];
    } else {
        int i = 0;
        while (sigma > table_sigma[i + 1]) i++;
        double t = (sigma - table_sigma[i]) / (table_sigma[i + 1] - table_sigma[i]);
        error = table_error[i][p] + t * (table_error[i + 1][p] - table_error[i][p]);
    }
    return error < M_SQRT2 ? error : M_SQRT2;
}
