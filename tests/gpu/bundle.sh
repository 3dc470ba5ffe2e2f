#!/usr/bin/env bash
# Pack what a lent GPU machine needs to run tests/gpu/run.sh without
# building: the tools, the GPU test and benchmark programs, libdb_cuda.so,
# and every shared library they load that the GPU machine's image may lack
# (oneDNN, libvips and its deps, msgpack-c, ZeroMQ, protobuf-c, Open MPI,
# ...).  That image is a CUDA + PyTorch one without our Debian -dev
# packages and with no network, so `make` cannot run there; our binaries
# (Debian 12, glibc 2.36) run on its newer glibc.
#
# Left out on purpose: glibc's own libraries and libstdc++/libgcc_s (the
# machine's newer ones are compatible and must be used), and the CUDA
# libraries (cudart, cuBLAS, cuDNN: the machine's own, from /usr/local/cuda
# or PyTorch's nvidia-* wheels; run.sh finds them).
#
#   usage: bash tests/gpu/bundle.sh     -> build/gpu-bundle.tar.xz
# then, in the repo root of a session lent a GPU, see tests/gpu/README.md.
set -euo pipefail
cd "$(dirname "$0")/../.."
make -j"$(nproc)" all >/dev/null
[ -f build/lib/libdb_cuda.so ] || { echo "bundle: build/lib/libdb_cuda.so missing (no nvcc?)" >&2; exit 1; }
S=build/gpu-bundle.d
rm -rf "$S" && mkdir -p "$S/build/bin" "$S/build/lib" "$S/build/tests/gpu" "$S/build/bundle-lib"
cp -a build/bin/db-* "$S/build/bin/"
cp -a build/lib/libdb_cuda.so "$S/build/lib/"
# the kernel tracer, where CUPTI was found (its libcupti travels below)
[ -f build/lib/libdb_kprof.so ] && cp -a build/lib/libdb_kprof.so "$S/build/lib/"
cp -a build/tests/dbtest "$S/build/tests/"
# the oracle tests that t0100-fixtures.sh runs on the GPU (they skip there
# unless a call carries tests/data: tests/gpu/README.md)
for t in test_unet test_unet_backward test_clip test_vae test_txt2img test_graph test_train_graph; do cp -a "build/tests/$t" "$S/build/tests/"; done
mkdir -p "$S/build/bench"
cp -a build/bench/bench_sd "$S/build/bench/"
for p in build/tests/gpu/*; do
    [ -f "$p" ] && [ -x "$p" ] && cp -a "$p" "$S/build/tests/gpu/"
done
skip='^(libc|libm|libpthread|libdl|librt|libresolv|libutil|ld-linux-x86-64|libstdc\+\+|libgcc_s|libcudart|libcublas|libcublasLt|libcudnn[a-z_]*|libnccl)\.so'
for f in "$S"/build/bin/* "$S"/build/tests/dbtest "$S"/build/tests/test_* "$S"/build/tests/gpu/* "$S"/build/bench/* "$S"/build/lib/*.so; do
    ldd "$f" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// { print $1, $3 }'
done | sort -u | while read -r name path; do
    [[ "$name" =~ $skip ]] && continue
    cp -L "$path" "$S/build/bundle-lib/$name"
done
strip "$S"/build/bin/* "$S"/build/tests/dbtest "$S"/build/tests/test_* "$S"/build/tests/gpu/* "$S"/build/bench/* 2>/dev/null || true
# the benchmark and parity scripts read nothing from tests/data; the tools
# test uses tests/data/photos (tracked, small, travels with the tree)
tar -C "$S" -cJf build/gpu-bundle.tar.xz build
rm -rf "$S"
echo "build/gpu-bundle.tar.xz: $(du -h build/gpu-bundle.tar.xz | cut -f1)," \
    "$(tar -tJf build/gpu-bundle.tar.xz | grep -c bundle-lib/) libraries"
