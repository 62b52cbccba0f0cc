/* libFuzzer target: essence-run's pipeline reader (pipelines/run_plan.c). The bytes are a
 * pipeline file; loading must not crash or leak, and a rejection is ES_ERR_USAGE naming the
 * file and a line ("PATH:LINE: ..."), or a missing input/program naming the file. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../pipelines/run_plan.c"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    static char path[64];
    if (!path[0]) {
        snprintf(path, sizeof path, "/tmp/essence-fuzz-pipeline-%d.yaml", (int)getpid());
    }
    FILE *f = fopen(path, "wb");
    if (!f) return 0;
    fwrite(data, 1, size, f);
    fclose(f);
    run_plan plan;
    es_error err = {0};
    char *sets[1] = {"project.sigma=2"};
    int rc = run_plan_load(&plan, path, sets, size % 2, &err);
    if (rc && (rc != ES_ERR_USAGE && rc != ES_ERR_RUNTIME)) abort();
    if (rc == ES_ERR_USAGE && !strstr(err.msg, "essence-fuzz-pipeline") && !strstr(err.msg, "--set")) abort();
    if (!rc) {
        for (int s = 0; s < plan.n_stages; s++) {
            char **argv = run_stage_argv(&plan.stages[s], plan.stages[s].shards > 1 ? 0 : -1);
            char *line = argv ? run_quote_argv(argv) : NULL;
            free(line);
            run_free_argv(argv);
        }
    }
    run_plan_free(&plan);
    return 0;
}
