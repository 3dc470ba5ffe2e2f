// Asynchronous copies from global to shared memory (PTX cp.async, sm_80 and
// later): a thread queues 16-byte copies, closes them into a group
// (commit), and later waits until at most n of its groups are still in
// flight (wait<n>); the data is its own to read after the wait, the other
// threads' after a __syncthreads that follows their waits.  A kernel so
// loads the next tile while it computes on this one (double buffering).
//   copy16(dst, src, bytes): dst shared, src global, both 16-byte aligned;
//   bytes 16 copies, 0 writes 16 zero bytes and reads nothing (src must
//   still be a valid address: pass any in-bounds one).
// Under the CPU emulator (tests/gpu/emu) the copies are queued per thread
// and done at the wait that covers their group, so a read before its wait
// sees the old bytes (a test fails), and a read by another thread not
// ordered by a barrier after the wait is a race that the ThreadSanitizer
// build reports.  With EMU_CPASYNC_EAGER=1 they are done at once instead
// (a real copy may land that early): a copy into a buffer other threads
// may still be reading, with no barrier between, is then the race
// ThreadSanitizer reports (run.sh --tsan runs the attention tests both ways).
#ifndef DB_CUDA_CP_ASYNC_H
#define DB_CUDA_CP_ASYNC_H

#include <stdint.h>

namespace db_cp {

#ifdef DB_CUDA_EMU_H
struct emu_copy {
    void *dst;
    const void *src;
    int bytes;
};
struct emu_queue {
    std::vector<emu_copy> open;                // not committed yet
    std::vector<std::vector<emu_copy>> groups; // committed, oldest first
};
inline thread_local emu_queue emu_q;
static bool emu_eager()
{
    static const bool eager = getenv("EMU_CPASYNC_EAGER") && strcmp(getenv("EMU_CPASYNC_EAGER"), "1") == 0;
    return eager;
}
__device__ __forceinline__ void copy16(void *dst, const void *src, int bytes)
{
    if ((uintptr_t)dst % 16 || (bytes && (uintptr_t)src % 16) || (bytes != 0 && bytes != 16)) // (a fault on the card)
        emu_refuse("cp.async of %d bytes from %p to %p: both must be 16-byte aligned", bytes, src, dst);
    if (emu_eager()) {
        memset(dst, 0, 16);
        memcpy(dst, src, (size_t)bytes);
        return;
    }
    emu_q.open.push_back(emu_copy{dst, src, bytes});
}
__device__ __forceinline__ void commit()
{
    emu_q.groups.push_back(std::move(emu_q.open));
    emu_q.open.clear();
}
template <int N> __device__ __forceinline__ void wait()
{
    while (emu_q.groups.size() > (size_t)N) {
        for (const emu_copy &c : emu_q.groups.front()) {
            memset(c.dst, 0, 16);
            memcpy(c.dst, c.src, (size_t)c.bytes);
        }
        emu_q.groups.erase(emu_q.groups.begin());
    }
}
#else
__device__ __forceinline__ void copy16(void *dst, const void *src, int bytes)
{
    const unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }
#endif

} // namespace db_cp

#endif
