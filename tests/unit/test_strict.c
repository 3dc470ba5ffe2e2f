/* The cpu-strict device (kernels/ops.h): buffers closed to the host between
 * ops and copies, copies checked for direction, the ops' numbers the CPU's. */
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/ops.h"
#include "tap.h"

int main(void)
{
    db_err err = {0};
    db_ctx *c = NULL;
    if (!tap_ok(db_ctx_create_device(&c, "cpu-strict", 1, &err) == 0, "cpu-strict context%s%s",
                err.code ? ": " : "", err.msg))
        return tap_done();
    tap_ok(c->device == DB_CPU_STRICT, "its device is not DB_CPU (model code stages through host buffers)");
    enum { N = 5000 };
    float *h = malloc(N * sizeof *h), *back = malloc(N * sizeof *back);
    for (int i = 0; i < N; i++)
        h[i] = (float)i * 0.5f;
    float *d = db_ctx_alloc(c, N * sizeof *d);
    tap_ok(d != NULL, "alloc");
    tap_ok(db_ctx_copy(c, d, h, N * sizeof *d, DB_COPY_H2D) == 0, "host-to-device copy");
    tap_ok(db_add_forward(c, d, d, d, N) == 0, "an op on the buffer");
    tap_ok(db_ctx_copy(c, back, d, N * sizeof *d, DB_COPY_D2H) == 0, "device-to-host copy");
    int same = 1;
    for (int i = 0; i < N; i++)
        same &= back[i] == 2 * h[i];
    tap_ok(same, "the op's result arrives");

    /* the host touching device memory dies, as on a GPU */
    fflush(stdout);
    pid_t pid = fork();
    if (pid == 0) {
        volatile float x = d[7];
        (void)x;
        _exit(0);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    tap_ok(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "reading a device buffer from the host crashes (status %#x)",
           st);
    fflush(stdout);
    pid = fork();
    if (pid == 0) {
        d[0] = 1.0f;
        _exit(0);
    }
    waitpid(pid, &st, 0);
    tap_ok(WIFSIGNALED(st) && WTERMSIG(st) == SIGSEGV, "writing one crashes too");

    /* copies in the wrong direction are refused, naming the sides */
    int rc = db_ctx_copy(c, d, back, N * sizeof *d, DB_COPY_D2H);
    tap_ok(rc != 0 && strstr(c->err.msg, "device-to-host copy") && strstr(c->err.msg, "from host memory"),
           "a device-to-host copy from host memory is refused: %s", c->err.msg);
    db_ctx_clear_error(c);
    rc = db_ctx_copy(c, back, h, N * sizeof *d, DB_COPY_D2D);
    tap_ok(rc != 0 && strstr(c->err.msg, "device-to-device"), "a device-to-device copy between host buffers is refused");
    db_ctx_clear_error(c);
    float *d2 = db_ctx_alloc(c, N * sizeof *d2);
    tap_ok(db_ctx_copy(c, d2, d, N * sizeof *d, DB_COPY_D2D) == 0 && db_ctx_zero(c, d, N * sizeof *d) == 0,
           "device-to-device copy and zero");
    tap_ok(db_ctx_copy(c, back, d2, N * sizeof *d, DB_COPY_D2H) == 0 && back[3] == 3.0f, "the copy arrived");
    db_ctx_free(c, d);
    db_ctx_free(c, d2);
    db_ctx_destroy(c);
    free(h);
    free(back);
    return tap_done();
}
