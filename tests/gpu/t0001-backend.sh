#!/usr/bin/env bash
# The CUDA backend loads, sees a GPU, and its kernels agree with the CPU.
. "$(dirname "$0")/../lib.sh"
dbtest cuda-selftest > "$T/self.txt" 2>&1
rc=$?
sed 's/^/# /' "$T/self.txt"
check "CUDA backend loads and finds a GPU" "[ $rc != 3 ]"
check "axpy kernel and cuBLAS SAXPY equal the CPU result" "[ $rc = 0 ]"
done_testing
