#include "resume.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fingerprint.h"

static int listed(const char *name, const char *const *names) {
    for (; names && *names; names++)
        if (!strcmp(name, *names)) return 1;
    return 0;
}

json_t *es_resume_key_from_config(const es_config *cfg, const char *const *also_leave_out) {
    json_t *key = json_object();
    for (int i = 0; key && i < cfg->n_options; i++) {
        const char *name = cfg->options[i].name, *value = cfg->values[i];
        if (!value || listed(name, ES_RUN_ONLY_OPTIONS) || listed(name, also_leave_out)) continue;
        if (json_object_set_new(key, name, json_string(value))) {
            json_decref(key);
            return NULL;
        }
    }
    return key;
}

char *es_resume_key_text(const json_t *key, es_error *err) { return es_json_canonical(key, NULL, err); }

/* How one entry reads in a message: an input by its fingerprint, an option by its values. */
static void describe(char *out, size_t size, const char *name, const json_t *then, const json_t *now, int is_option) {
    const char *a = json_is_string(then) ? json_string_value(then) : NULL, *b = json_is_string(now) ? json_string_value(now) : NULL;
    const char *prefix = is_option ? "--" : "";
    if ((a && es_fingerprint_valid(a)) || (b && es_fingerprint_valid(b)))
        snprintf(out, size, "%s%s (its content differs)", prefix, name);
    else
        snprintf(out, size, "%s%s (%s there, %s now)", prefix, name, a ? a : "unset", b ? b : "unset");
}

int es_resume_key_compare(const char *stored, const char *now, const char *what, es_error *err) {
    if (stored && !strcmp(stored, now)) return ES_OK;
    if (!stored)
        return es_fail(err, ES_ERR_USAGE,
                       "%s records no resume key (begun by an older essence?): it cannot be shown to come from these inputs; "
                       "start again without --resume",
                       what);
    json_t *a = json_loads(stored, 0, NULL), *b = json_loads(now, 0, NULL);
    char list[768] = "";
    size_t used = 0;
    int n = 0;
    const char *name;
    json_t *value;
    /* Options and inputs of either key, each once. */
    json_t *all = json_object();
    if (a) json_object_foreach(a, name, value) json_object_set(all, name, json_null());
    if (b) json_object_foreach(b, name, value) json_object_set(all, name, json_null());
    json_object_foreach(all, name, value) {
        json_t *then = a ? json_object_get(a, name) : NULL, *current = b ? json_object_get(b, name) : NULL;
        if (then && current && json_equal(then, current)) continue;
        char one[256];
        describe(one, sizeof one, name, then, current, !strpbrk(name, " _"));
        if (used < sizeof list) used += (size_t)snprintf(list + used, sizeof list - used, "%s%s", n++ ? ", " : "", one);
    }
    json_decref(all), json_decref(a), json_decref(b);
    if (!n) snprintf(list, sizeof list, "its resume key is unreadable");
    return es_fail(err, ES_ERR_USAGE,
                   "%s was begun with other inputs or options: %s; resume with the same ones, or start again without --resume",
                   what, list);
}
