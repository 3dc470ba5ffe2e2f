// The emulator refuses what a card refuses (cuda_emu.h emu_check_launch,
// mma.h ldsm4, cp_async.h copy16): each case runs in a child process that
// must end by abort() with cuda_emu's message, and a well-formed launch of
// the same kernels must run.  t1700 builds and runs it.
//   usage: refuse   (TAP on stdout)
#include "tests/gpu/emu/cuda_emu.h"
#include "kernels/cuda/cp_async.h"
#include "kernels/cuda/mma.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

static void nothing(float *p) { (void)p; }
// the warp's 32 lanes each give row address base + off + 16 lane (bytes)
static void ldsm(int off)
{
    alignas(16) static unsigned short tile[32 * 8 + 8];
    uint32_t r[4];
    db_mma::ldsm4<false>(r, (const char *)tile + off + 16 * (threadIdx.x % 32));
}
static void cpasync(const float *src, int soff)
{
    float *s = emu_smem();
    db_cp::copy16(s + 4 * threadIdx.x, (const char *)(src + 4 * threadIdx.x) + soff, 16);
    db_cp::commit();
    db_cp::wait<0>();
}

static int n, bad;
// expect: 1 the child must abort with cuda_emu's message, 0 it must exit 0
template <class F> static void run(const char *what, int expect, F f)
{
    int fd[2];
    if (pipe(fd))
        abort();
    fflush(stdout);
    const pid_t pid = fork();
    if (pid == 0) {
        dup2(fd[1], 2);
        close(fd[0]);
        f();
        _exit(0);
    }
    close(fd[1]);
    char buf[512] = "";
    size_t len = 0;
    for (ssize_t k; (k = read(fd[0], buf + len, sizeof buf - 1 - len)) > 0;) // to the end (no SIGPIPE)
        len += (size_t)k;
    buf[len] = 0;
    close(fd[0]);
    int st = 0;
    waitpid(pid, &st, 0);
    const int aborted = WIFSIGNALED(st) && WTERMSIG(st) == SIGABRT && strstr(buf, "cuda_emu: ");
    const int ok = expect ? aborted : WIFEXITED(st) && WEXITSTATUS(st) == 0;
    char *nl = strchr(buf, '\n');
    if (nl)
        *nl = 0;
    printf("%sok %d - %s%s%s\n", ok ? "" : "not ", ++n, what, *buf ? ": " : "", buf);
    if (!ok)
        printf("# the child %s %d\n", WIFSIGNALED(st) ? "died of signal" : "exited", WIFSIGNALED(st) ? WTERMSIG(st) : WEXITSTATUS(st));
    bad |= !ok;
}

int main()
{
    alignas(16) static float src[256 + 4];
    run("a launch of grid 4, block 64 runs", 0, [] { EMU_LAUNCH(4, 64, 0, 0, nothing, (float *)NULL); });
    run("a zero grid is refused", 1, [] { EMU_LAUNCH(0, 64, 0, 0, nothing, (float *)NULL); });
    run("a grid's y over 65535 is refused", 1, [] { EMU_LAUNCH(dim3(1, 65536), 64, 0, 0, nothing, (float *)NULL); });
    run("1025 threads a block are refused", 1, [] { EMU_LAUNCH(1, dim3(1025), 0, 0, nothing, (float *)NULL); });
    run("228 KB of dynamic shared memory are refused", 1,
        [] { EMU_LAUNCH(1, 32, 232448 + 16, 0, nothing, (float *)NULL); });
    run("ldmatrix on 16-byte aligned rows runs", 0, [] { EMU_LAUNCH(1, 32, 0, 0, ldsm, 16); });
    run("ldmatrix on rows 8 bytes off is refused", 1, [] { EMU_LAUNCH(1, 32, 0, 0, ldsm, 8); });
    run("cp.async between aligned addresses runs", 0, [] { EMU_LAUNCH(1, 64, 1024, 0, cpasync, (const float *)src, 0); });
    run("cp.async from 4 bytes off is refused", 1,
        [] { EMU_LAUNCH(1, 64, 1024, 0, cpasync, (const float *)src, 4); });
    printf("1..%d\n", n);
    return bad;
}
