// The emulator's per-thread and per-launch state (cuda_emu.h).
#include "tests/gpu/emu/cuda_emu.h"

#include <dlfcn.h>
#include <execinfo.h>

thread_local uint3 emu_tid, emu_bid;
dim3 emu_bdim, emu_gdim;
thread_local emu_block *emu_blk;
thread_local int emu_lin;
alignas(128) float emu_dyn_smem[1 << 16];
std::mutex emu_mtx;
emu_graph *emu_cap;
int emu_cap_bad;
thread_local emu_cluster *emu_cl;
thread_local int emu_cl_rank;
thread_local std::optional<std::barrier<>::arrival_token> emu_cl_tok;
thread_local float *emu_smem_base;

// EMU_LAUNCH_LOG (cuda_emu.h emu_note): opened at the first note, appended
// to; each line "what<TAB>file:line<TAB>frames", the frames the calls that
// led here as module+offset (tests/gpu/emu/census.sh resolves them with
// addr2line).  EMU_DRY=1: the work only noted (read once, at the first note).
int emu_dry;
void emu_note(const char *what, const char *file, int line) {
    static FILE *log;
    static int off;
    if (off) return;
    if (!log) {
        const char *p = getenv("EMU_LAUNCH_LOG"), *d = getenv("EMU_DRY");
        if (!p || !*p || !(log = fopen(p, "a"))) { off = 1; return; }
        emu_dry = d && !strcmp(d, "1");
    }
    const char *base = strrchr(file, '/');
    fprintf(log, "%s\t%s:%d\t", what, base ? base + 1 : file, line);
    void *fr[24];
    int n = backtrace(fr, 24);
    for (int i = 1; i < n; i++) {
        Dl_info di;
        if (dladdr(fr[i], &di) && di.dli_fname) {
            const char *m = strrchr(di.dli_fname, '/');
            // the return address less one: the call's own line
            fprintf(log, " %s+%#lx", m ? m + 1 : di.dli_fname, (unsigned long)((char *)fr[i] - (char *)di.dli_fbase) - 1);
        }
    }
    fputc('\n', log);
    fflush(log);
}
