#include "arena.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

struct db_arena_block {
    db_arena_block *next;
    size_t size, used;
    _Alignas(64) unsigned char data[];
};

void db_arena_init(db_arena *a, size_t first_block)
{
    a->head = NULL;
    a->block_size = first_block ? first_block : 4096;
    a->used_total = 0;
}

void *db_arena_alloc(db_arena *a, size_t n)
{
    if (n > SIZE_MAX - 64)
        return NULL;
    n = (n + 63) & ~(size_t)63;
    db_arena_block *b = a->head;
    if (!b || b->size - b->used < n) {
        size_t sz = a->block_size;
        while (sz < n)
            sz *= 2;
        b = aligned_alloc(64, (sizeof *b + sz + 63) & ~(size_t)63);
        if (!b)
            return NULL;
        b->size = sz;
        b->used = 0;
        b->next = a->head;
        a->head = b;
        if (a->block_size < ((size_t)1 << 30))
            a->block_size *= 2;
    }
    void *p = b->data + b->used;
    b->used += n;
    a->used_total += n;
    return p;
}

char *db_arena_strndup(db_arena *a, const char *s, size_t n)
{
    char *p = db_arena_alloc(a, n + 1);
    if (p) {
        memcpy(p, s, n);
        p[n] = 0;
    }
    return p;
}

char *db_arena_strdup(db_arena *a, const char *s) { return db_arena_strndup(a, s, strlen(s)); }

void db_arena_free(db_arena *a)
{
    for (db_arena_block *b = a->head, *n; b; b = n) {
        n = b->next;
        free(b);
    }
    a->head = NULL;
    a->used_total = 0;
}
