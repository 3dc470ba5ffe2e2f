/* Arena allocator: many small allocations, one free.  Blocks grow
 * geometrically; allocations are 64-byte aligned (cache line / AVX-512). */
#ifndef DB_ARENA_H
#define DB_ARENA_H

#include <stddef.h>

typedef struct db_arena_block db_arena_block;
typedef struct db_arena {
    db_arena_block *head;
    size_t block_size; /* next block's size */
    size_t used_total;
} db_arena;

void db_arena_init(db_arena *a, size_t first_block);
/* NULL when out of memory. */
void *db_arena_alloc(db_arena *a, size_t n);
char *db_arena_strdup(db_arena *a, const char *s);
char *db_arena_strndup(db_arena *a, const char *s, size_t n);
void db_arena_free(db_arena *a);

#endif
