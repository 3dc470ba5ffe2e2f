/* Progress on stderr: a redrawn bar when stderr is a terminal, otherwise one
 * plain line every tenth of the work (at most one per 2 s, and none at all
 * for jobs that take under a second). */
#ifndef DB_PROGRESS_H
#define DB_PROGRESS_H

#include <stdint.h>

typedef struct db_progress {
    const char *label;
    int64_t total, done, every, last_line;
    int tty, enabled;
    double t0, last_draw;
} db_progress;

void db_progress_start(db_progress *p, const char *label, int64_t total, int enabled);
void db_progress_add(db_progress *p, int64_t n);
void db_progress_end(db_progress *p);

#endif
