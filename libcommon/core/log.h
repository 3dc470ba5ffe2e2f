/* Logging to stderr, prefixed with the program name.  The program name and
 * verbosity live in a db_log value the tool owns and passes down; library
 * code that logs takes a `const db_log *` (NULL means silent). */
#ifndef DB_LOG_H
#define DB_LOG_H

enum { DB_LOG_QUIET = 0, DB_LOG_WARN = 1, DB_LOG_INFO = 2, DB_LOG_DEBUG = 3 };

typedef struct db_log {
    const char *prog; /* "db-ckpt" */
    int level;        /* messages at or below this level are printed */
} db_log;

void db_warn(const db_log *lg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void db_info(const db_log *lg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void db_debug(const db_log *lg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* "prog: error: msg" (always printed; tools call it right before exiting). */
void db_error(const db_log *lg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#endif
