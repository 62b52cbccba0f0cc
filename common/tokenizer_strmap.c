/* Byte strings -> int32: the tokenizer's vocabulary and word cache (open addressing, keys in
 * one arena). */
#include <stdlib.h>
#include <string.h>

#include "tokenizer_internal.h"

uint64_t tk_hash(const void *key, size_t len) {
    /* FNV-1a over 8-byte words then bytes, with a final avalanche: keys are short. */
    const unsigned char *p = key;
    uint64_t h = 0xcbf29ce484222325ull ^ (len * 0x9e3779b97f4a7c15ull);
    while (len >= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        h = (h ^ word) * 0x100000001b3ull;
        h ^= h >> 29;
        p += 8, len -= 8;
    }
    while (len--) h = (h ^ *p++) * 0x100000001b3ull;
    h ^= h >> 32;
    h *= 0xd6e8feb86659fd93ull;
    h ^= h >> 32;
    return h;
}

static int strmap_grow(tk_strmap *map) {
    size_t n_slots = map->n_slots ? map->n_slots * 2 : 1024;
    uint32_t *slots = calloc(n_slots, sizeof *slots);
    if (!slots) return -1;
    for (size_t i = 0; i < map->n_entries; i++) {
        size_t at = map->entries[i].hash & (n_slots - 1);
        while (slots[at]) at = (at + 1) & (n_slots - 1);
        slots[at] = (uint32_t)i + 1;
    }
    free(map->slots);
    map->slots = slots;
    map->n_slots = n_slots;
    return 0;
}

int tk_strmap_reserve(tk_strmap *map, size_t n) {
    while (map->n_slots < 2 * n + 2)
        if (strmap_grow(map)) return -1;
    if (n > map->cap_entries) {
        void *grown = realloc(map->entries, n * sizeof *map->entries);
        if (!grown) return -1;
        map->entries = grown;
        map->cap_entries = n;
    }
    return 0;
}

int32_t tk_strmap_get(const tk_strmap *map, const void *key, size_t len) {
    if (!map->n_slots) return -1;
    uint64_t hash = tk_hash(key, len);
    for (size_t at = hash & (map->n_slots - 1);; at = (at + 1) & (map->n_slots - 1)) {
        uint32_t slot = map->slots[at];
        if (!slot) return -1;
        const struct tk_strmap_entry *entry = &map->entries[slot - 1];
        if (entry->hash == hash && entry->length == len && memcmp(map->arena + entry->offset, key, len) == 0)
            return entry->value;
    }
}

int tk_strmap_put(tk_strmap *map, const void *key, size_t len, int32_t value) {
    if ((map->n_entries + 1) * 2 > map->n_slots && strmap_grow(map)) return -1;
    uint64_t hash = tk_hash(key, len);
    size_t at = hash & (map->n_slots - 1);
    for (; map->slots[at]; at = (at + 1) & (map->n_slots - 1)) {
        struct tk_strmap_entry *entry = &map->entries[map->slots[at] - 1];
        if (entry->hash == hash && entry->length == len && memcmp(map->arena + entry->offset, key, len) == 0) {
            entry->value = value; /* a later entry wins, as in a Rust HashMap built in order */
            return 0;
        }
    }
    if (map->n_entries == map->cap_entries) {
        size_t cap = map->cap_entries ? map->cap_entries * 2 : 1024;
        void *grown = realloc(map->entries, cap * sizeof *map->entries);
        if (!grown) return -1;
        map->entries = grown;
        map->cap_entries = cap;
    }
    if (map->arena_len + len + 1 > map->arena_cap) {
        size_t cap = map->arena_cap ? map->arena_cap * 2 : 65536;
        while (cap < map->arena_len + len + 1) cap *= 2;
        char *grown = realloc(map->arena, cap);
        if (!grown) return -1;
        map->arena = grown;
        map->arena_cap = cap;
    }
    memcpy(map->arena + map->arena_len, key, len);
    map->entries[map->n_entries] = (struct tk_strmap_entry){(uint32_t)map->arena_len, (uint32_t)len, hash, value};
    map->arena_len += len;
    map->slots[at] = (uint32_t)++map->n_entries;
    return 0;
}

void tk_strmap_free(tk_strmap *map) {
    free(map->slots), free(map->entries), free(map->arena);
    memset(map, 0, sizeof *map);
}

