#!/usr/bin/env bash
# One call on a lent GPU machine: build the CUDA backend, run every
# CUDA-vs-CPU parity test (make check-cuda: tests/gpu/t*.sh and
# build/tests/gpu/test_cuda_ops), the tools on cpu and cuda, the op
# benchmark (bench_cuda_ops, again with DB_CUDNN_FIND=1) and the whole-model
# benchmark against PyTorch (make bench-cuda: bench_sd fp32+bf16,
# bench_torch.py, one table), and write a log and a short table under $OUT.
# Under 8 minutes on an H100: every stage runs under a timeout cut to what is
# left of DEADLINE seconds, so a slow or hung stage costs only its own
# figures; each stage's exit status goes to $OUT/table.md as soon as it ends.
#   usage: OUT=/some/dir bash tests/gpu/run.sh
# $OUT gets at most 8 files (what a lent machine sends back): log.txt,
# check-cuda.txt, tools.txt, bench_ops.md (also the kernel profiles),
# bench_sd.txt, bench_torch.txt, bench.md (ours vs PyTorch), table.md.
set -uo pipefail   # not -e: a failed stage must not stop the next
SELF="$(cd "$(dirname "$0")" && pwd)/$(basename "$0")"
cd "$(dirname "$0")/../.."
# the tools on the tiny model, cpu vs cuda (a separate process, so that a
# timeout can end it): bash run.sh --tools
tools_check() {
    set -e   # a failed tool run stops it; a failed comparison is counted (bad)
    T=$(mktemp -d)
    build/bin/db-ckpt init --arch tiny --seed 42 "$T/tiny" >/dev/null
    # where a difference starts: one step without and with guidance, then
    # ten steps op by op, each cpu vs cuda (all printed before any verdict)
    local bad=0 r g st
    for cfg in "1 1 --no-graph" "1 7.5 --no-graph" "10 7.5 --no-graph" "10 7.5"; do
        read -r st g ng <<<"$cfg"
        for d in cpu cuda; do
            timeout 60 build/bin/db-sample -q -m "$T/tiny" -p "a photo of a dog" --steps "$st" \
                --guidance "$g" --width 128 --height 128 --seed 1 --device $d $ng --latents-out "$T/$d-$st-$g$ng.dbt" \
                -o "$T/$d.png"
        done
        r=$(build/tests/dbtest dbt-rel "$T/cpu-$st-$g$ng.dbt" "$T/cuda-$st-$g$ng.dbt")
        echo "db-sample cpu vs cuda, $st step(s), guidance $g${ng:+, $ng}: final latents $r"
        awk -v r="${r##* }" 'BEGIN { exit !(r + 0 <= 1e-4) }' || bad=1
    done
    cp "$T/cuda-10-7.5.dbt" "$T/cuda.dbt"
    cp "$T/cuda-10-7.5--no-graph.dbt" "$T/nograph.dbt"
    r=$(build/tests/dbtest dbt-rel "$T/cuda.dbt" "$T/nograph.dbt")
    echo "db-sample cuda graph vs --no-graph final latents: $r$(cmp -s "$T/cuda.dbt" "$T/nograph.dbt" && echo ' (byte-identical)')"
    awk -v r="${r##* }" 'BEGIN { exit !(r + 0 <= 1e-6) }' || bad=1
    for d in cpu cuda; do
        timeout 60 build/bin/db-prep -q -m "$T/tiny" --size 128 --caption "a photo of sks dog" \
            --device $d tests/data/photos/dog -o "$T/inst-$d.dbt"
    done
    build/tests/dbtest dbt-rel "$T/inst-cpu.dbt" "$T/inst-cuda.dbt" each | head -n 8
    r=$(build/tests/dbtest dbt-rel "$T/inst-cpu.dbt" "$T/inst-cuda.dbt" | tail -n 1)
    echo "db-prep cpu vs cuda posteriors: $r"
    awk -v r="${r##* }" 'BEGIN { exit !(r + 0 <= 1e-4) }' || bad=1
    # plain and fused backward (the optimizer inside the backward, one window)
    for f in "" --fused-backward; do
        for d in cpu cuda; do
            timeout 90 build/bin/db-train -q -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 3 \
                --lr 1e-4 --train-text-encoder --device $d $f -o "$T/run-$d$f"
        done
        python3 - "$T/run-cpu$f/ckpt-000003/state.json" "$T/run-cuda$f/ckpt-000003/state.json" "$f" <<'PY' || bad=1
import json, sys
a, b = (json.load(open(f))["loss"] for f in sys.argv[1:3])
rel = max(abs(a[k] - b[k]) / abs(a[k]) for k in ("loss", "grad_norm"))
print("db-train %s cpu vs cuda, 3 steps: loss %.8g vs %.8g, grad norm %.8g vs %.8g (rel %.3g)"
      % (sys.argv[3] or "(plain)", a["loss"], b["loss"], a["grad_norm"], b["grad_norm"], rel))
sys.exit(0 if rel <= 1e-4 else 1)
PY
    done
    # the graph tests on the GPU (their CPU runs are in make check): replays
    # bit-identical to op-by-op runs, through the sampler and the trainer
    DB_TEST_DEVICE=cuda TOP=$PWD timeout 60 build/tests/test_graph || bad=1
    DB_TEST_DEVICE=cuda DB_TEST_MODEL="$T/tiny" TOP=$PWD timeout 120 build/tests/test_train_graph 2>"$T/ttg.err" || bad=1
    # (a refused capture passes there, both runs op by op: it warns on stderr)
    head -20 "$T/ttg.err"
    if grep -qi "without a graph" "$T/ttg.err"; then
        echo "test_train_graph: a UNet graph capture was refused (above): the replays went untested"
        bad=1
    fi
    # the UNet forward and backward replayed as CUDA graphs (the default) vs op by op
    timeout 90 build/bin/db-train -q -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 3 \
        --lr 1e-4 --train-text-encoder --device cuda --no-graph -o "$T/run-nograph"
    if cmp -s "$T/run-cuda/ckpt-000003/model.safetensors" "$T/run-nograph/ckpt-000003/model.safetensors"; then
        echo "db-train cuda graphs vs --no-graph, 3 steps: byte-identical weights"
    else
        echo "db-train cuda graphs vs --no-graph, 3 steps: weights DIFFER"
        bad=1
    fi
    # the fused step's backward replayed as a graph, its optimizer steps
    # inside reading their scalars from device memory (session 17): 4 steps
    # (the first direct, the second captured, two replays) vs op by op, in
    # bf16 (the weights' working copies written by the steps) with both
    # optimizers; a refused capture shows as the trainer's warning
    for o in adamw adamw8bit; do
        for gr in "" --no-graph; do
            timeout 90 build/bin/db-train -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 4 --lr 1e-4 --train-text-encoder \
                --device cuda --precision bf16 --fused-backward --optimizer $o $gr -o "$T/run-fused-$o$gr" \
                2>"$T/fused-$o$gr.log" || { bad=1; tail -3 "$T/fused-$o$gr.log"; }
        done
        # (|| true: no such line is the good case, and grep's 1 would end
        # the stage under set -e with pipefail: call 9 lost these checks so)
        grep -i "without a graph" "$T/fused-$o.log" | head -2 || true
        if cmp -s "$T/run-fused-$o/ckpt-000004/model.safetensors" "$T/run-fused-$o--no-graph/ckpt-000004/model.safetensors" &&
            cmp -s "$T/run-fused-$o/ckpt-000004/optimizer.safetensors" \
                "$T/run-fused-$o--no-graph/ckpt-000004/optimizer.safetensors"; then
            echo "db-train cuda bf16 --fused-backward --optimizer $o, graphs vs --no-graph, 4 steps: byte-identical checkpoint"
        else
            echo "db-train cuda bf16 --fused-backward --optimizer $o, graphs vs --no-graph, 4 steps: checkpoints DIFFER"
            bad=1
        fi
    done
    # how often the trainer records its UNet graphs (db_unet_graph_run's
    # debug line): 2 expected in 6 steps, the forward's and the backward's.
    # More means a call's arguments or buffers change between steps and the
    # graphs are re-recorded (call 5's SD1.5 profile had a graph destroyed and
    # one instantiated among two timed steps; call 6 read 2 here: a late
    # first recording, not a recurring one).  Reported, not a failure.
    n=$(timeout 90 build/bin/db-train -v -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 6 \
        --lr 1e-4 --train-text-encoder --device cuda -o "$T/run-rec" 2>&1 | grep -c "recorded as a CUDA graph" || true)
    echo "db-train cuda, 6 steps: UNet graphs recorded $n time(s) (2 expected: forward, backward)"
    # session 25's activation twins (kernels/cuda/cuda.h): the bf16 sampler
    # and a bf16 training run (plain backward, the text encoder trained)
    # with them (the default) and without (DB_CUDA_TWINS=0): the same bytes
    for tw in 1 0; do
        DB_CUDA_TWINS=$tw timeout 60 build/bin/db-sample -q -m "$T/tiny" -p "a photo of a dog" --steps 4 \
            --guidance 7.5 --width 128 --height 128 --seed 1 --device cuda --precision bf16 \
            --latents-out "$T/twins$tw.dbt" -o "$T/twins$tw.png"
        DB_CUDA_TWINS=$tw timeout 90 build/bin/db-train -q -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 3 --lr 1e-4 \
            --train-text-encoder --device cuda --precision bf16 -o "$T/run-twins$tw"
    done
    if cmp -s "$T/twins1.dbt" "$T/twins0.dbt" &&
        cmp -s "$T/run-twins1/ckpt-000003/model.safetensors" "$T/run-twins0/ckpt-000003/model.safetensors"; then
        echo "db-sample and db-train cuda bf16, activation twins on vs DB_CUDA_TWINS=0: byte-identical latents and weights"
    else
        echo "db-sample / db-train cuda bf16, activation twins on vs DB_CUDA_TWINS=0: DIFFER"
        bad=1
    fi
    # checkpoints through the pinned stage (--async-save, auto on a GPU) vs
    # written synchronously: the same bytes, and the log says pinned
    timeout 90 build/bin/db-train -v -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 3 --lr 1e-4 --train-text-encoder \
        --device cuda --async-save on -o "$T/run-pinned" 2>"$T/pinned.log"
    timeout 90 build/bin/db-train -q -m "$T/tiny" -i "$T/inst-cpu.dbt" --steps 3 --lr 1e-4 --train-text-encoder \
        --device cuda --async-save off -o "$T/run-sync"
    if cmp -s "$T/run-pinned/ckpt-000003/model.safetensors" "$T/run-sync/ckpt-000003/model.safetensors" &&
        cmp -s "$T/run-pinned/ckpt-000003/optimizer.safetensors" "$T/run-sync/ckpt-000003/optimizer.safetensors" &&
        grep -q "pinned memory" "$T/pinned.log"; then
        echo "db-train cuda --async-save on (pinned stage) vs off: byte-identical checkpoint"
    else
        echo "db-train cuda --async-save on vs off: checkpoints DIFFER or the stage was not pinned"
        grep -i "checkpoint" "$T/pinned.log" | head -5
        bad=1
    fi
    [ "$bad" = 0 ]
}
# make bench-cuda's recipe (the Makefile calls this; the bundle, which has no
# build tree, too): bench_sd, bench_torch.py, the table into $OUT; $1 $2 the
# two timeouts; BENCH_SD_FLAGS / BENCH_TORCH_FLAGS replace the defaults
bench_cuda() {
    local o=$OUT rs rt b=${B:-build}
    local sf=${BENCH_SD_FLAGS:---device cuda --precision fp32,bf16 --budget 3 --sample-budget 15 --fused-backward}
    local tf=${BENCH_TORCH_FLAGS:---device cuda --precision fp32,bf16 --budget 3}
    mkdir -p "$o"
    echo "== bench_sd $sf"
    # shellcheck disable=SC2086 # the flags are words
    timeout "$1" "$b/bench/bench_sd" $sf 2>&1 | tee "$o/bench_sd.txt"
    rs=${PIPESTATUS[0]}
    echo "== bench_torch.py $tf"
    # shellcheck disable=SC2086
    PYTHONUNBUFFERED=1 timeout "$2" python3 tests/gpu/bench_torch.py $tf 2>&1 | tee "$o/bench_torch.txt"
    rt=${PIPESTATUS[0]}
    python3 tests/gpu/bench_table.py "$o/bench_sd.txt" "$o/bench_torch.txt" | tee "$o/bench.md"
    [ "$rs" = 0 ] && [ "$rt" = 0 ]
}
# the GPU parity tests (make check-cuda calls this: the one list) through
# prove (PROVE_FLAGS, default -fv), or without it (a machine without Perl's
# prove): each must exit 0 with no "not ok"
check_cuda() {
    local b=${B:-$PWD/build}
    local tests=(tests/gpu/t*.sh "$b/tests/gpu/test_cuda_ops" "$b/tests/gpu/test_attention_tc") f bad=0
    if command -v prove >/dev/null; then
        # shellcheck disable=SC2086 # the flags are words
        TOP=$PWD B=$b prove ${PROVE_FLAGS:--fv} "${tests[@]}"
        return
    fi
    local OUT=${OUT:-$b}
    for f in "${tests[@]}"; do
        echo "## $f"
        if [[ $f == *.sh ]]; then TOP=$PWD B=$b bash "$f"; else TOP=$PWD B=$b "$f"; fi >"$OUT/.t" 2>&1
        local rc=$?
        cat "$OUT/.t"
        { [ $rc = 0 ] && ! grep -q '^not ok' "$OUT/.t"; } || { echo "## $f FAILED (exit $rc)"; bad=1; }
    done
    rm -f "$OUT/.t"
    return $bad
}
# compute-sanitizer ($SAN) memcheck over the quick GPU parity tests: the
# failing lines and the error summary, exit 1 on any error
sanitize() {
    local t rc f bad=0
    f=$(mktemp)
    for t in test_cuda_ops test_attention_tc; do
        echo "== compute-sanitizer memcheck $t (quick)"
        # --report-api-errors no: the tests provoke API errors on purpose (a
        # stream sync inside a capture must fail the capture); memcheck
        # counted those 6 as errors on 2026-11-27 while it found no memory
        # error in either program
        DB_CUDA_TEST_QUICK=1 B="$PWD/build" "$SAN" --tool memcheck --leak-check no --report-api-errors no \
            --print-limit 20 --error-exitcode 99 "build/tests/gpu/$t" > "$f" 2>&1
        rc=$?
        grep -v '^ok ' "$f"
        [ "$rc" = 0 ] || { echo "== $t under memcheck: exit $rc"; bad=1; }
    done
    rm -f "$f"
    return $bad
}
case "${1:-}" in
--tools) tools_check; exit ;;
--sanitize) sanitize; exit ;;
--bench-cuda) bench_cuda "$2" "$3"; exit ;;
--check-cuda) check_cuda; exit ;;
esac

OUT=${OUT:-build/gpu-out}
DEADLINE=${DEADLINE:-450}   # seconds from here; the stages' timeouts shrink to fit
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
echo "== $(date -u +%FT%TZ) $(hostname)"
CARD=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
# cuDNN/cuBLAS may come from Python wheels on the GPU machine
EXTRA=""
for d in $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, x, "lib") for p in nvidia.__path__ for x in os.listdir(p)))' 2>/dev/null); do
    [ -d "$d" ] && EXTRA="$EXTRA $d"
done
CUDA_LIBDIRS="${CUDA_LIBDIRS:-/usr/local/cuda/lib64}$EXTRA"
export CUDA_LIBDIRS
echo "== CUDA_LIBDIRS=$CUDA_LIBDIRS"

STAGES=()
# table.md: the stages so far (rewritten after each, so a run cut off from
# outside still leaves one), then the benchmark tables
write_table() {
    {
        echo "| date | card | stage | exit | seconds |"
        echo "|---|---|---|---|---:|"
        for s in ${STAGES[@]+"${STAGES[@]}"}; do echo "| $(date -u +%F) | ${CARD:-?} | $s |"; done
        if [ -s "$OUT/bench.md" ]; then echo; echo "### ours vs PyTorch (make bench-cuda)"; echo; cat "$OUT/bench.md"; fi
        # the tables, and the "### " heading that marks the DB_CUDNN_FIND=1 run's
        if [ -s "$OUT/bench_ops.md" ]; then echo; echo "### ops (bench_cuda_ops)"; echo; grep -E '^(\||### )' "$OUT/bench_ops.md"; fi
    } > "$OUT/table.md"
}
# left CAP [RESERVE]: seconds a stage may take: CAP at most, and no more than
# what is left of DEADLINE after RESERVE seconds kept for the benchmarks; 1 at least
left() {
    local l=$((DEADLINE - SECONDS - ${2:-0}))
    [ "$l" -gt "$1" ] && l=$1
    [ "$l" -lt 1 ] && l=1
    echo "$l"
}
# stage NAME FILE CAP CMD...: run CMD under a timeout, its output to the log
# and to $OUT/FILE (appended; "-" for the log alone), record its exit status
# (124: timed out).  RESERVE (environment) as for left.
stage() {
    local name=$1 file=$2 cap=$3; shift 3
    local t0=$SECONDS lim rc
    lim=$(left "$cap" "${RESERVE:-0}")
    echo "== stage $name (timeout ${lim}s, ${SECONDS}s into the run)"
    if [ "$file" = - ]; then
        timeout -k 10 "$lim" "$@" 2>&1
    else
        timeout -k 10 "$lim" "$@" 2>&1 | tee -a "$OUT/$file"
    fi
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== stage $name: TIMED OUT after ${lim}s"
    echo "== stage $name: exit $rc, $((SECONDS - t0)) s"
    STAGES+=("$name | $([ "$rc" = 0 ] && echo pass || echo "FAIL ($rc)") | $((SECONDS - t0))")
    write_table
    return "$rc"
}


# build/gpu-bundle.tar.xz (tests/gpu/bundle.sh, carried into the call): the
# binaries built on the development machine and the libraries they need,
# for a GPU machine that cannot build (see tests/gpu/README.md); else make.
if [ -f build/gpu-bundle.tar.xz ]; then
    stage unpack - 60 tar -xJf build/gpu-bundle.tar.xz || { echo "UNPACK FAILED"; exit 1; }
    LD_LIBRARY_PATH="$PWD/build/bundle-lib:${CUDA_LIBDIRS// /:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export LD_LIBRARY_PATH
    echo "== bundle: LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    missing=$(for f in build/bin/* build/tests/gpu/* build/bench/* build/lib/*.so; do
        ldd "$f" 2>/dev/null | grep 'not found'; done | sort -u)
    [ -n "$missing" ] && echo "== bundle: libraries not found: $missing"
    # which bundled libraries the machine has itself (ldconfig): what a
    # slimmer bundle could leave out, to make room for tests/data's fixtures
    have=$(for f in build/bundle-lib/*; do n=$(basename "$f"); ldconfig -p 2>/dev/null | grep -q "^[[:space:]]$n " && echo "$n"; done)
    echo "== bundle: $(echo "$have" | grep -c .) of $(ls build/bundle-lib | wc -l) bundled libraries are on the machine too: $(echo $have)"
else
    stage build - 300 make -j"$(nproc)" all CUDA=1 CUDA_LIBDIRS="$CUDA_LIBDIRS" || { echo "BUILD FAILED"; exit 1; }
fi
# the benchmarks keep BENCH_RESERVE seconds whatever the checks take
BENCH_RESERVE=${BENCH_RESERVE:-210}
# RUN_ONLY=tools: that stage alone (a short second call after a fix to it)
if [ "${RUN_ONLY:-}" = tools ]; then
    stage tools tools.txt 180 bash "$SELF" --tools
    exit
fi
RESERVE=$BENCH_RESERVE stage check-cuda check-cuda.txt 150 bash "$SELF" --check-cuda
echo "== tools on the tiny model, cpu vs cuda: db-sample, db-prep, db-train"
RESERVE=$BENCH_RESERVE stage tools tools.txt 180 bash "$SELF" --tools
echo "== attention on tensor cores vs the fp32 kernel at SD1.5 shapes (DB_BENCH=1 test_attention_tc)"
RESERVE=$((BENCH_RESERVE - 15)) stage attn-tc-bench bench_ops.md 45 env DB_BENCH=1 B="$PWD/build" \
    build/tests/gpu/test_attention_tc
# the same with the mma.sync kernels' operands loaded 32 and 16 bits a lane
# instead of by ldmatrix (DB_ATTN_LDSM=0), then with the forward's two row
# tiles a warp (DB_ATTN_MR=2; the default until call 9 measured it slower),
# each under its own heading: what the defaults gain is what these tell
# attn_variant NAME VAR=VALUE WHAT: the attention benchmark again with VAR
attn_variant() {
    echo "== the same with $2 ($3)"
    printf '\n%s\n' "### $2: $3" >> "$OUT/bench_ops.md"
    RESERVE=$((BENCH_RESERVE - 15)) stage "$1" bench_ops.md 40 env DB_BENCH=1 "$2" B="$PWD/build" \
        build/tests/gpu/test_attention_tc
}
attn_variant attn-noldsm-bench DB_ATTN_LDSM=0 "the mma.sync attention kernels without ldmatrix"
attn_variant attn-mr2-bench DB_ATTN_MR=2 "the mma.sync forward with two row tiles a warp"
# the same without the mma.sync kernels' cp.async pipelines
# (DB_ATTN_CPASYNC=0: each streamed tile loaded, then used), under its own
# heading, with OLD_PATHS=1 only (calls 5 and 6 timed it: BENCHMARKS.md;
# check-cuda still tests the path).  (The WMMA kernels, DB_ATTN_MMA=0,
# were timed against the mma.sync ones in calls 1-4.)
if [ "${OLD_PATHS:-0}" = 1 ]; then
    attn_variant attn-nopipe-bench DB_ATTN_CPASYNC=0 "the mma.sync attention kernels without cp.async"
fi
echo "== bench_cuda_ops (fp32, then bf16 for the matmul-class ops; cudaEvent medians)"
printf '\n%s\n' "### bench_cuda_ops (fp32, then bf16)" >> "$OUT/bench_ops.md"
RESERVE=$((BENCH_RESERVE - 15)) stage bench-ops bench_ops.md 60 env B="$PWD/build" build/tests/gpu/bench_cuda_ops
# the bf16 table again without cublasLt's bias epilogue (DB_GEMM_LT=0: the
# float32 product and the epilogue kernel): its linear_forward lines
# against the default's above decide whether the bias epilogue stays
echo "== bench_cuda_ops bf16 with DB_GEMM_LT=0 (biased linears without cublasLt)"
printf '\n%s\n' "### bench_cuda_ops bf16 with DB_GEMM_LT=0 (biased linears without cublasLt)" >> "$OUT/bench_ops.md"
RESERVE=$((BENCH_RESERVE - 15)) stage bench-ops-nolt bench_ops.md 30 env DB_GEMM_LT=0 BENCH_OPS_ONLY=bf16 \
    B="$PWD/build" build/tests/gpu/bench_cuda_ops
# the same with the 16-bit convolutions NCHW as before channels-last
# (DB_CONV_NCHW=1), under its own heading in bench_ops.md, to compare the
# conv lines, with OLD_PATHS=1 only (timed in calls 2-6); with the same
# reserve as the runs above, so it takes only time they left.
# (DB_CUDNN_FIND=1's run, 2026-11-27: mixed, BENCHMARKS.md.)
if [ "${OLD_PATHS:-0}" = 1 ]; then
    echo "== bench_cuda_ops with DB_CONV_NCHW=1 (16-bit convolutions NCHW, as before 2026-11-27)"
    printf '\n%s\n' "### bench_cuda_ops with DB_CONV_NCHW=1 (16-bit convolutions NCHW)" >> "$OUT/bench_ops.md"
    RESERVE=$((BENCH_RESERVE - 15)) stage bench-ops-nchw bench_ops.md 45 env DB_CONV_NCHW=1 BENCH_OPS_ONLY=bf16 \
        B="$PWD/build" build/tests/gpu/bench_cuda_ops
fi
# make bench-cuda writes bench_sd.txt, bench_torch.txt and bench.md into $OUT
# itself; its two programs get their own timeouts (made to fit here too)
sd=$(left 150)
th=$(left $((sd + 75)))
th=$((th > sd ? th - sd : 1))
stage bench-cuda - $((sd + th + 20)) env OUT="$OUT" bash "$SELF" --bench-cuda "$sd" "$th"
# where the time goes: the kernel tracer (tests/gpu/kprof.c, CUPTI, loaded
# by the driver) over bench_sd's bf16 figures but the sampler, a table per
# figure (per call: by category and by kernel) appended to bench_ops.md;
# only with 60 s to spare.  The fused step too since session 20: it ran
# 10.5 ms over the plain step in call 9 where its extra passes (the
# per-tensor clip's sums and scaling) come to ~2-3 ms by the bytes; and
# 40 kernels a table (call 9's 20 left 125 kernels of the step unnamed)
KP=$PWD/build/lib/libdb_kprof.so
if [ -f "$KP" ] && [ $((DEADLINE - SECONDS)) -ge 60 ]; then
    printf '\n%s\n' "### kernel profiles (CUPTI: tests/gpu/kprof.c), bench_sd bf16, per call" >> "$OUT/bench_ops.md"
    stage kprof - 70 env CUDA_INJECTION64_PATH="$KP" DB_KPROF_OUT="$OUT/bench_ops.md" DB_KPROF_TOP=40 \
        build/bench/bench_sd --device cuda --precision bf16 --only fwd,train,vae,fused --reps 2 \
        --budget 0.5
else
    echo "== kprof skipped: $((DEADLINE - SECONDS)) s left$([ -f "$KP" ] || echo ", no $KP")"
fi
# session 25's activation twins (kernels/cuda/cuda.h): the bf16 forward and
# training step with them (the default) and without (DB_CUDA_TWINS=0, read
# at the ctx's creation), one process after the other, under their own heading
if [ $((DEADLINE - SECONDS)) -ge 60 ]; then
    printf '\n%s\n' "### bench_sd bf16 --only fwd,train: activation twins on, then off (DB_CUDA_TWINS=0)" >> "$OUT/bench_ops.md"
    stage twins bench_ops.md 60 bash -c 'for t in 1 0; do echo "DB_CUDA_TWINS=$t"; DB_CUDA_TWINS=$t \
        build/bench/bench_sd --device cuda --precision bf16 --only fwd,train --budget 1 || exit 1; done'
else
    echo "== twins skipped: $((DEADLINE - SECONDS)) s left"
fi
# #7's memory targets, never measured before session 16: a full fine-tune
# with the text encoder in 16 GB, and in 10 GB with 8-bit moments and
# checkpointing.  The fused-backward step (the configuration whose plan
# fits: README) with the text encoder and checkpointing, AdamW then
# adamw8bit, bf16: each line's peak_mib against its plan_mib and the
# targets, under its own heading in bench_ops.md (bench_sd.txt's figures
# would be replaced by these: bench_table.py keeps a figure's last line);
# with 60 s to spare
if [ $((DEADLINE - SECONDS)) -ge 60 ]; then
    printf '\n%s\n' "### memory: bench_sd bf16 --only fused --train-text-encoder --gradient-checkpointing (targets 16 GB, 10 GB with adamw8bit)" >> "$OUT/bench_ops.md"
    stage memory bench_ops.md 80 bash -c 'for o in adamw adamw8bit; do build/bench/bench_sd --device cuda \
        --precision bf16 --only fused --train-text-encoder --gradient-checkpointing --optimizer $o --reps 1 \
        --budget 0.5 || exit 1; done'
else
    echo "== memory skipped: $((DEADLINE - SECONDS)) s left"
fi
# torch.compile is optional: only with a minute and a half to spare, the
# forward alone, appended to bench_torch.txt, then the table again.
# TORCH_COMPILE=0 skips it (it has not finished compiling in the time a
# lent machine leaves, twice, 2026-11-27: the time goes to the stages below)
if [ "${TORCH_COMPILE:-1}" != 0 ] && [ $((DEADLINE - SECONDS)) -ge 90 ]; then
    stage torch-compile bench_torch.txt $((DEADLINE - SECONDS - 10)) env PYTHONUNBUFFERED=1 \
        python3 tests/gpu/bench_torch.py --device cuda --precision fp32,bf16 --only fwd --compile --budget 2
else
    echo "== torch.compile skipped: $((DEADLINE - SECONDS)) s left, TORCH_COMPILE=${TORCH_COMPILE:-1}"
fi
# checkpoint writes (#7: 800 steps with checkpoints at 500 and 800): one
# SD1.5 trainer state written synchronously and in the background, when a
# minute is left (appended to bench_sd.txt; the table lists them).  Calls
# 7 and 8 cut it off at 75 s after its figures (two 10.3 GB writes beside
# the setup): up to 110 s now, leaving the sanitizer below its 45 where
# the deadline allows.
if [ $((DEADLINE - SECONDS)) -ge 60 ]; then
    ck=$((DEADLINE - SECONDS - 50))
    ck=$((ck < 75 ? 75 : ck > 110 ? 110 : ck))
    stage checkpoint-save - "$ck" bash -c "set -o pipefail; build/bench/bench_sd \
        --device cuda --precision bf16 --only train --reps 2 --budget 2 --save 2>&1 | tee -a '$OUT/bench_sd.txt'"
else
    echo "== checkpoint-save skipped: $((DEADLINE - SECONDS)) s left"
fi
# memory errors the emulator cannot see (its threads share one address
# space, no bounds): compute-sanitizer's memcheck over the quick parity
# tests, with what time is left (it works on Firecracker machines, not on
# gVisor: KINDS.md); appended to check-cuda.txt, informational
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
if [ -n "$SAN" ] && [ $((DEADLINE - SECONDS)) -ge 45 ]; then
    stage sanitize check-cuda.txt $((DEADLINE - SECONDS - 10)) env SAN="$SAN" bash "$SELF" --sanitize
else
    echo "== sanitize skipped: $((DEADLINE - SECONDS)) s left$([ -n "$SAN" ] || echo ', no compute-sanitizer')"
fi
# the table again: with the compiled lines, or for the first time when make
# bench-cuda was cut off before its last step
python3 tests/gpu/bench_table.py "$OUT/bench_sd.txt" "$OUT/bench_torch.txt" > "$OUT/bench.md"
write_table
cat "$OUT/table.md"
echo "== done in ${SECONDS}s"
# exit 0 when the parity checks and the tools passed (the benchmarks report, they do not gate)
grep -qE '^\| [^|]+ \| [^|]+ \| (check-cuda|tools) \| FAIL' "$OUT/table.md" && exit 1
exit 0
