#include "err.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

int db_err_set(db_err *e, int code, const char *fmt, ...)
{
    if (!e)
        return -1;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->code = code ? code : DB_EFORMAT;
    return -1;
}

int db_err_prefix(db_err *e, const char *fmt, ...)
{
    if (!e)
        return -1;
    char ctx[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(ctx, sizeof ctx - 2, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    size_t len = (size_t)n < sizeof ctx - 2 ? (size_t)n : sizeof ctx - 3;
    memcpy(ctx + len, ": ", 2);
    len += 2;
    /* shift the old message right (truncating its tail) and put ctx in front */
    size_t old = strnlen(e->msg, sizeof e->msg - 1);
    if (old > sizeof e->msg - 1 - len)
        old = sizeof e->msg - 1 - len;
    memmove(e->msg + len, e->msg, old);
    memcpy(e->msg, ctx, len);
    e->msg[len + old] = 0;
    if (!e->code)
        e->code = DB_EFORMAT;
    return -1;
}

int db_err_errno(db_err *e, const char *what)
{
    int saved = errno;
    return db_err_set(e, saved == ENOMEM ? DB_ENOMEM : DB_EIO, "%s: %s", what, strerror(saved));
}

void db_err_clear(db_err *e)
{
    if (e) {
        e->code = 0;
        e->msg[0] = 0;
    }
}
