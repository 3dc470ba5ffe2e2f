#include "log.h"

#include <stdarg.h>
#include <stdio.h>

static void vlog(const db_log *lg, int level, const char *tag, const char *fmt, va_list ap)
{
    if (!lg || lg->level < level)
        return;
    char buf[2048];
    vsnprintf(buf, sizeof buf, fmt, ap);
    /* one fprintf so lines from parallel processes do not interleave mid-line */
    fprintf(stderr, "%s: %s%s\n", lg->prog ? lg->prog : "db", tag, buf);
}

#define DEFINE_LOG(fn, level, tag)                  \
    void fn(const db_log *lg, const char *fmt, ...) \
    {                                               \
        va_list ap;                                 \
        va_start(ap, fmt);                          \
        vlog(lg, level, tag, fmt, ap);              \
        va_end(ap);                                 \
    }

DEFINE_LOG(db_warn, DB_LOG_WARN, "warning: ")
DEFINE_LOG(db_info, DB_LOG_INFO, "")
DEFINE_LOG(db_debug, DB_LOG_DEBUG, "debug: ")

void db_error(const db_log *lg, const char *fmt, ...)
{
    db_log always = {lg ? lg->prog : NULL, DB_LOG_QUIET};
    va_list ap;
    va_start(ap, fmt);
    vlog(&always, DB_LOG_QUIET, "error: ", fmt, ap);
    va_end(ap);
}
