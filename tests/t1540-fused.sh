#!/usr/bin/env bash
# db-train --fused-backward on the tiny model (train.h: the optimizer steps
# each UNet block and text-encoder layer inside the backward, from one
# gradient window instead of gradient buffers):
#   - without clipping, byte-identical checkpoints to the plain run (the
#     fused step computes the same gradients and the same AdamW);
#   - with clipping (per tensor) a different run, resumable after kill -9
#     byte-identically; resuming a plain run with it is refused;
#   - usage errors (gradient accumulation, fp16) exit 2 and leave nothing;
#   - --plan prints the window instead of the gradients, within 15 % of the
#     measured peak, and less than the plain run's;
#   - the same run under --device cpu-strict (a GPU's memory discipline) is
#     byte-identical; two MPI processes: fused = plain without clipping.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
train_fixtures

TR="db-train -q --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 2 --train-text-encoder"
same() { cmp -s "$1/model.safetensors" "$2/model.safetensors" && cmp -s "$1/optimizer.safetensors" "$2/optimizer.safetensors"; }

# --- 1. without clipping: the plain run's bytes -------------------------------------
ok "plain, no clipping: 3 steps" $TR --max-grad-norm 0 --steps 3 -o "$T/P0"
ok "fused, no clipping: 3 steps" $TR --max-grad-norm 0 --steps 3 --fused-backward -o "$T/F0"
check "fused == plain without clipping (model and optimizer bytes)" same "$T/P0/ckpt-000003" "$T/F0/ckpt-000003"
check "the run's config records it" "grep -q '\"fused-backward\": true' '$T/F0/config.json'"
ok "plain, no clipping, --no-graph (each UNet call op by op)" $TR --max-grad-norm 0 --steps 3 --no-graph -o "$T/G0"
check "--no-graph == the graphs' replays (model and optimizer bytes)" same "$T/P0/ckpt-000003" "$T/G0/ckpt-000003"
check "--no-graph is not part of the run's configuration" "! grep -q 'graph' '$T/G0/config.json'"

# --- 2. with clipping: its own run, resumable ------------------------------------------
ok "fused, clip 1.0: 4 steps, a checkpoint every 2" $TR --fused-backward --steps 4 --save-every 2 -o "$T/F1"
ok "plain, clip 1.0: 4 steps" $TR --steps 4 --save-every 2 -o "$T/P1"
check "per-tensor clipping is another run than the global clip" "! same '$T/F1/ckpt-000004' '$T/P1/ckpt-000004'"
$TR --fused-backward --steps 4 --save-every 2 -o "$T/F2" 2>/dev/null &
pid=$!
for _ in $(seq 1500); do [ -d "$T/F2/ckpt-000002" ] && break; sleep 0.02; done
kill -9 $pid 2>/dev/null
wait $pid 2>/dev/null
ok "--resume a fused run killed after step 2" $TR --resume "$T/F2"
check "resumed == straight" same "$T/F1/ckpt-000004" "$T/F2/ckpt-000004"
fails_with 1 "fused-backward" "resuming a plain run with --fused-backward: exit 1, names the option" \
    $TR --resume "$T/P1" --fused-backward --steps 6

# --- 3. usage errors ------------------------------------------------------------------
fails_with 2 "grad-accum" "--fused-backward --grad-accum 2: exit 2" $TR --fused-backward --grad-accum 2 -o "$T/U1"
fails_with 2 "fp16" "--fused-backward --precision fp16: exit 2" $TR --fused-backward --precision fp16 -o "$T/U2"
check "nothing left behind" "[ ! -e '$T/U1' ] && [ ! -e '$T/U2' ]"
fails_with 2 "fp16" "resuming a fused run in fp16: exit 2" $TR --resume "$T/F1" --precision fp16 --steps 6

# --- 4. --plan -----------------------------------------------------------------------
plan_of() { $TR --steps 2 --plan "$@" -o "$T/X" | sed -n 's/.*predicted peak *\([0-9.]*\) MiB.*/\1/p'; }
check "--plan --fused-backward prints the gradient window" \
    "$TR --steps 2 --plan --fused-backward -o '$T/X' | grep -q 'gradient window (fused backward)'"
check "--plan --fused-backward --device cuda: the window, and the device peak falls" \
    "a=\$($TR --steps 2 --plan --device cuda -o '$T/X' | sed -n 's/.*predicted device peak *\([0-9.]*\) MiB.*/\1/p'); \
     b=\$($TR --steps 2 --plan --device cuda --fused-backward -o '$T/X' | sed -n 's/.*predicted device peak *\([0-9.]*\) MiB.*/\1/p'); \
     echo \"# device peak \$a -> \$b MiB\"; [ -n \"\$a\" ] && [ -n \"\$b\" ] && $PY -c \"import sys; sys.exit(not \$b < \$a)\""
fused_plan_vs_peak() {
    local pred meas plain
    pred=$(plan_of --fused-backward)
    plain=$(plan_of)
    meas=$(db-train --model "$M" --instance "$I" --class "$C" --lr 1e-4 --seed 3 --threads 2 --train-text-encoder \
        --steps 2 --fused-backward -o "$T/X" 2>&1 | sed -n 's/.*peak memory \([0-9.]*\) MiB.*/\1/p')
    rm -rf "$T/X"
    echo "# --plan --fused-backward: predicted ${pred:-?} MiB (plain ${plain:-?}), measured ${meas:-?} MiB"
    [ -n "$pred" ] && [ -n "$meas" ] && [ -n "$plain" ] &&
        $PY -c "import sys; p, m, q = $pred, $meas, $plain; sys.exit(abs(p - m) > 0.15 * m or not p < q)"
}
check "--plan --fused-backward within 15 % of the measured peak, below the plain plan" fused_plan_vs_peak
check "--plan writes nothing" "[ ! -e '$T/X' ]"

# --- 5. the GPU memory discipline, and two processes ---------------------------------------
ok "fused on --device cpu-strict" $TR --fused-backward --steps 2 --device cpu-strict -o "$T/S"
ok "fused on cpu, the same 2 steps" $TR --fused-backward --steps 2 -o "$T/S0"
check "cpu-strict == cpu" same "$T/S/ckpt-000002" "$T/S0/ckpt-000002"
if command -v mpirun >/dev/null; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
    MT="db-train -q --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 1 --train-text-encoder"
    ok "mpirun -np 2, plain, no clipping" mpirun -np 2 $MT --max-grad-norm 0 --steps 2 -o "$T/M0"
    ok "mpirun -np 2, fused, no clipping" mpirun -np 2 $MT --max-grad-norm 0 --steps 2 --fused-backward -o "$T/M1"
    check "two processes: fused == plain (the units' sums are the buffer's)" same "$T/M0/ckpt-000002" "$T/M1/ckpt-000002"
else
    for _ in 1 2 3; do _n=$((_n + 1)); echo "ok $_n # SKIP mpirun not installed (make deps installs openmpi-bin)"; done
fi
done_testing
