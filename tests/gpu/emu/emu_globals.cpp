// The emulator's per-thread and per-launch state (cuda_emu.h).
#include "tests/gpu/emu/cuda_emu.h"

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
