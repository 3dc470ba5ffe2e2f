#include "progress.h"

#include <stdio.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

void db_progress_start(db_progress *p, const char *label, int64_t total, int enabled)
{
    p->label = label;
    p->total = total;
    p->done = 0;
    p->every = total > 10 ? total / 10 : 1;
    p->last_line = 0;
    p->tty = isatty(2);
    p->enabled = enabled;
    p->t0 = p->last_draw = now_s();
}

static void draw(db_progress *p, int final)
{
    double el = now_s() - p->t0;
    double frac = p->total > 0 ? (double)p->done / (double)p->total : 0;
    if (p->tty) {
        char bar[31];
        int fill = (int)(frac * 30);
        for (int i = 0; i < 30; i++)
            bar[i] = i < fill ? '#' : '.';
        bar[30] = 0;
        double eta = frac > 0 ? el / frac - el : 0;
        fprintf(stderr, "\r%s [%s] %lld/%lld %.1fs eta %.1fs%s", p->label, bar, (long long)p->done,
                (long long)p->total, el, eta, final ? "\n" : "");
    } else {
        fprintf(stderr, "%s: %lld/%lld (%.1fs)\n", p->label, (long long)p->done, (long long)p->total, el);
    }
    fflush(stderr);
}

void db_progress_add(db_progress *p, int64_t n)
{
    p->done += n;
    if (!p->enabled)
        return;
    if (p->tty) {
        double t = now_s();
        if (t - p->last_draw > 0.1) {
            p->last_draw = t;
            draw(p, 0);
        }
    } else if (p->done - p->last_line >= p->every && p->done < p->total) {
        /* logs get one line per `every` units, but not more than one per 2 s */
        double t = now_s();
        if (t - p->last_draw >= 2.0) {
            p->last_line = p->done;
            p->last_draw = t;
            draw(p, 0);
        }
    }
}

void db_progress_end(db_progress *p)
{
    /* a job that finished within a second needs no progress report in a log */
    if (p->enabled && (p->tty || now_s() - p->t0 >= 1.0))
        draw(p, 1);
}
