/* Error values with context.
 *
 * Library functions return 0 on success and -1 on failure, filling a caller's
 * db_err.  Callers add context on the way up with db_err_prefix, so the final
 * message reads "file: tensor 'x': shape mismatch 320 vs 640".  Only tools/
 * decide to print and exit.
 */
#ifndef DB_ERR_H
#define DB_ERR_H

#include <stdarg.h>

enum {
    DB_EOK = 0,
    DB_EIO,      /* read/write/open failed */
    DB_EFORMAT,  /* input is malformed or lies about itself */
    DB_EUNSUPP,  /* well-formed but outside what we handle */
    DB_ENOMEM,
    DB_EUSAGE,   /* caller passed something invalid */
    DB_ESECURITY, /* refused for safety (e.g. a pickle global) */
    DB_ENUMERIC   /* a computation gave NaN or infinity (training diverged) */
};

typedef struct db_err {
    int code;
    char msg[1536];
} db_err;

/* Set the message (printf-style); returns -1 so callers can `return db_err_set(...)`. */
int db_err_set(db_err *e, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* Prepend "context: " to the current message; returns -1. */
int db_err_prefix(db_err *e, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Set from errno: "what: strerror(errno)". */
int db_err_errno(db_err *e, const char *what);
void db_err_clear(db_err *e);

#endif
