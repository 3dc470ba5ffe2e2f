#!/usr/bin/env bash
# bench_sd (make bench-cuda's program) on the CPU with the tiny model: every
# figure prints its BENCH line with positive numbers, --only and --precision
# select, bad options are usage errors; bench_table.py joins ours and a
# PyTorch file into ratios; db-train --plan --device cuda prints the device
# estimate (it needs no GPU).  A few seconds.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
BS=$B/bench/bench_sd
if [ ! -x "$BS" ]; then
    echo "1..0 # SKIP no $BS (make)"
    exit 0
fi
SMALL="--tiny --threads 1 --steps 3 --reps 2 --budget 1"

# valid FILE NAME: FILE has a BENCH line for NAME whose ms, tflops and
# peak_mib are positive numbers and that carries no error
valid() {
    awk -v want="$2" '
        $1 == "BENCH" {
            delete f
            for (i = 2; i <= NF; i++) { k = $i; sub(/=.*/, "", k); v = $i; sub(/^[^=]*=/, "", v); f[k] = v }
            if (f["name"] != want) next
            seen = 1
            if ("error" in f) bad = 1
            for (k in need) if (!(need[k] in f) || f[need[k]] !~ /^[0-9.e+-]+$/ || f[need[k]] + 0 <= 0) bad = 1
        }
        BEGIN { need[1] = "ms"; need[2] = "tflops"; need[3] = "peak_mib" }
        END { exit !(seen && !bad) }' "$1"
}

$BS $SMALL > "$T/all.txt" 2> "$T/all.err"
rc=$?
sed 's/^/# /' "$T/all.txt" "$T/all.err" | head -30
check "bench_sd --tiny on the CPU exits 0" "[ $rc = 0 ]"
for n in unet_fwd_b2 unet_fwd_b2_graph train_step train_step_nograph sample_ddim_cfg sample_ddim_cfg_nograph \
    sample_ddim_cfg_hoststep \
    vae_decode; do
    check "$n: BENCH line with positive ms, tflops, peak_mib" valid "$T/all.txt" $n
done
check "the sample ran the asked steps" "grep -q 'name=sample_ddim_cfg .* steps=3' '$T/all.txt'"
check "a markdown table follows" "grep -q '^| unet_fwd_b2 | fp32 |' '$T/all.txt'"

# the checker can fail: a missing figure, a zero, an error line
printf 'BENCH impl=c name=unet_fwd_b2 device=cpu precision=fp32 ms=0.000 tflops=1 peak_mib=3 reps=1\n' > "$T/zero.txt"
printf 'BENCH impl=c name=train_step device=cpu precision=fp32 error="boom"\n' > "$T/err.txt"
check "the check fails on ms=0" "! valid '$T/zero.txt' unet_fwd_b2"
check "the check fails on an error line" "! valid '$T/err.txt' train_step"
check "the check fails on a missing figure" "! valid '$T/all.txt' no_such_figure"

$BS $SMALL --only train --fused-backward --precision fp32,fp16 > "$T/fused.txt" 2>&1
grep -v 'precision=fp16' "$T/fused.txt" > "$T/fused32.txt"
check "--fused-backward adds train_step_fused" valid "$T/fused32.txt" train_step_fused
check "... and refuses it in fp16 (an error line, not a crash)" \
    "grep -q 'name=train_step_fused .*precision=fp16 .*error=' '$T/fused.txt'"

# run.sh's memory stage: the fused step alone with the text encoder,
# checkpointing and 8-bit moments, the configuration named on its line
$BS $SMALL --only fused --train-text-encoder --gradient-checkpointing --optimizer adamw8bit > "$T/mem.txt" 2>&1
rc=$?
grep '^BENCH' "$T/mem.txt" | sed 's/^/# /'
check "--only fused: train_step_fused alone, exit 0" \
    "[ $rc = 0 ] && [ \$(grep -c '^BENCH' '$T/mem.txt') = 1 ] && grep -q 'name=train_step_fused ' '$T/mem.txt'"
check "  a valid line naming its configuration" \
    "valid '$T/mem.txt' train_step_fused &&
     grep -q 'name=train_step_fused .* checkpointing=1 text_encoder=1 optimizer=adamw8bit\$' '$T/mem.txt'"
fails_with 2 "optimizer bogus: unknown" "--optimizer bogus is a usage error" $BS --tiny --optimizer bogus

$BS $SMALL --only train --save > "$T/save.txt" 2>&1
# checkpoint_save, checkpoint_stage_alloc, and checkpoint_async_block /
# checkpoint_async through the stage and through it again (_again): 6 lines
check "--save: the synchronous, stage and background checkpoint lines with sizes" \
    "[ \$(grep -c 'name=checkpoint_[a-z_]* .* ms=[0-9.]* .* gb=[0-9.]*' '$T/save.txt') = 6 ] && ! grep -q error= '$T/save.txt' &&
     grep -q 'name=checkpoint_async_block .*copies=stage' '$T/save.txt'"
check "... and nothing left in the temporary directory" "! ls '${TMPDIR:-/tmp}' | grep -q bench_sd-save"

# bf16: the step beside the one whose UNet weight gradients stay float32
# (train.h no_grad16), in fp32 only the plain ones
$BS $SMALL --only train --precision fp32,bf16 > "$T/g16.txt" 2>&1
check "--only train --precision fp32,bf16: train_step_f32grads in bf16 only, beside train_step" \
    "valid '$T/g16.txt' train_step_f32grads && grep -q 'name=train_step_f32grads .*precision=bf16' '$T/g16.txt' &&
     ! grep -q 'name=train_step_f32grads .*precision=fp32' '$T/g16.txt' &&
     grep -q 'name=train_step .*precision=bf16' '$T/g16.txt'"

$BS $SMALL --only fwd --precision fp32,bf16 > "$T/fwd.txt" 2>&1
rc=$?
check "--only fwd --precision fp32,bf16 exits 0" "[ $rc = 0 ]"
check "  forward lines, direct and as a graph, fp32 and bf16, nothing else" \
    "[ \"\$(grep -c '^BENCH' '$T/fwd.txt')\" = 4 ] && grep -q 'name=unet_fwd_b2 .*precision=bf16' '$T/fwd.txt' &&
     grep -q 'name=unet_fwd_b2_graph .*precision=bf16' '$T/fwd.txt'"
# the kernel tracer's sections (tests/gpu/kprof.c, built where CUDA has
# CUPTI): preloaded into a CPU run, no kernels are traced, but bench_sd's
# marks reach it through CUDA_INJECTION64_PATH and its report at exit lists
# each figure with its timed calls
KP=$B/lib/libdb_kprof.so
if [ -f "$KP" ]; then
    LD_PRELOAD="$KP" CUDA_INJECTION64_PATH="$KP" DB_KPROF_OUT="$T/kprof.md" $BS $SMALL --only fwd,vae > "$T/kp.txt" 2>&1
    rc=$?
    sed 's/^/# /' "$T/kprof.md" | head -12
    check "bench_sd with the tracer preloaded exits 0" "[ $rc = 0 ]"
    n=$(grep -c '^### kernel profile: .* fp32 (cpu)$' "$T/kprof.md")
    check "  the report has a section per figure (3: got $n)" "[ '$n' = 3 ]"
    check "  with the timed calls' count" \
        "grep -A2 '^### kernel profile: vae_decode fp32 (cpu)' '$T/kprof.md' | grep -qE '^[0-9]+ calls?; no kernels recorded'"
    check "  and nothing without CUDA_INJECTION64_PATH" \
        "LD_PRELOAD='$KP' DB_KPROF_OUT='$T/none.md' $BS $SMALL --only vae >/dev/null 2>&1 && [ ! -e '$T/none.md' ]"
fi
fails_with 2 "unknown precision" "--precision fp64 is a usage error" $BS --tiny --precision fp64
fails_with 2 "only takes" "--only bogus is a usage error" $BS --tiny --only bogus
fails_with 2 "" "an unknown option is a usage error" $BS --tiny --frobnicate

# bench_table.py: ours and a PyTorch run side by side
cat > "$T/torch.txt" <<'EOF'
BENCH impl=torch name=unet_fwd_b2 device=cpu precision=fp32 ms=2.000 tflops=0.5 peak_mib=10.0 reps=5
BENCH impl=torch name=train_step device=cpu precision=fp32 error="out of memory"
EOF
python3 "$TOP/tests/gpu/bench_table.py" "$T/all.txt" "$T/torch.txt" > "$T/table.md" 2> "$T/table.err"
rc=$?
sed 's/^/# /' "$T/table.md" "$T/table.err" | head -20
check "bench_table.py exits 0" "[ $rc = 0 ]"
ours=$(awk '$1 == "BENCH" && /name=unet_fwd_b2 / { for (i = 2; i <= NF; i++) if ($i ~ /^ms=/) { sub(/ms=/, "", $i); print $i } }' "$T/all.txt")
want=$(awk -v o="$ours" 'BEGIN { printf "%.2f", o / 2.0 }')
check "  the forward's ratio ours/torch is ours / 2.000 ms (${want})" \
    "grep -E '^\| unet_fwd_b2 \| fp32 \|' '$T/table.md' | grep -qF '| ${want} |'"
check "  the figure torch failed on says so" "grep -E '^\| train_step \| fp32 \|' '$T/table.md' | grep -q 'error'"
check "  a figure torch lacks is listed with ours alone" "grep -qE '^\| vae_decode \| fp32 \|' '$T/table.md'"

# bench_torch.py: its UNet is SD1.5's (the count needs no torch); with torch
# installed, the tiny model runs on the CPU
python3 "$TOP/tests/gpu/bench_torch.py" --count > "$T/count.txt" 2>&1
rc=$?
sed 's/^/# /' "$T/count.txt"
check "bench_torch.py --count: 859,520,964 UNet parameters, SD1.5's" "[ $rc = 0 ] && grep -q '859520964 (SD1.5: 859520964) ok' '$T/count.txt'"
if python3 -c 'import torch' 2>/dev/null; then
    python3 "$TOP/tests/gpu/bench_torch.py" --tiny --device cpu --steps 3 --reps 2 --budget 1 > "$T/torch-tiny.txt" 2>&1
    rc=$?
    check "bench_torch.py --tiny --device cpu exits 0" "[ $rc = 0 ]"
    for n in unet_fwd_b2 train_step sample_ddim_cfg vae_decode; do
        check "  $n: BENCH line with positive numbers" valid "$T/torch-tiny.txt" $n
    done
fi

# db-train --plan --device cuda: host and device estimates, no GPU needed
train_fixtures
db-train --model "$M" --instance "$I" --class "$C" --plan --device cuda > "$T/plan.txt" 2>&1
rc=$?
sed 's/^/# /' "$T/plan.txt"
check "db-train --plan --device cuda exits 0" "[ $rc = 0 ]"
check "  it prints the host and the device peak" \
    "grep -q 'predicted peak' '$T/plan.txt' && grep -q 'predicted device peak .*(fp32)' '$T/plan.txt'"
db-train --model "$M" --instance "$I" --class "$C" --plan --device cuda \
    --validation-prompt "a photo of sks dog" > "$T/plan-val.txt" 2>&1
peak() { awk '/predicted device peak/ { print $(NF-2) }' "$1"; }
check "  --validation-prompt adds the validation row to a larger device peak ($(peak "$T/plan.txt") -> $(peak "$T/plan-val.txt") MiB)" \
    "grep -q 'validation samples (VAE, sampler)' '$T/plan-val.txt' && ! grep -q 'validation samples' '$T/plan.txt' &&
     awk -v a=\"\$(peak '$T/plan.txt')\" -v b=\"\$(peak '$T/plan-val.txt')\" 'BEGIN { exit !(b > a) }'"
# bench_sd --plan (the plan_mib of its train lines, what run.sh's memory
# stage compares the measured peak with) is db-train --plan's device peak
# for the same configuration (16x16 latents: the fixtures')
for f in "" "--fused-backward --train-text-encoder --gradient-checkpointing --optimizer adamw8bit"; do
    db-train --model "$M" --instance "$I" --class "$C" --plan --device cuda --precision bf16 $f > "$T/plan-f.txt" 2>&1
    want=$(peak "$T/plan-f.txt")
    if [ -n "$f" ]; then n=train_step_fused; else n=train_step; fi
    got=$($BS --tiny --latent 16 --plan --precision bf16 --only ${f:+fused} ${f:-train} $f |
        awk -v n=$n '$1 == "PLAN" && $2 == "name=" n { sub(/mib=/, "", $4); print $4 }')
    check "bench_sd --plan${f:+ $f}: $n's device plan ${got:-?} MiB, db-train --plan's $want" \
        "[ -n '$want' ] && [ '$got' = '$want' ]"
done
db-train --model "$M" --instance "$I" --class "$C" --plan > "$T/plan-cpu.txt" 2>&1
check "  --device cpu prints no device lines" "! grep -q 'device peak' '$T/plan-cpu.txt'"
db-train --model "$M" --instance "$I" --class "$C" --plan --validation-prompt "a photo of sks dog" \
    > "$T/plan-cpu-val.txt" 2>&1
hpeak() { awk '/predicted peak/ { print $(NF-1) }' "$1"; }
check "  and on the cpu too, the validation row to a larger peak ($(hpeak "$T/plan-cpu.txt") -> $(hpeak "$T/plan-cpu-val.txt") MiB)" \
    "grep -q 'validation samples (VAE, sampler)' '$T/plan-cpu-val.txt' &&
     awk -v a=\"\$(hpeak '$T/plan-cpu.txt')\" -v b=\"\$(hpeak '$T/plan-cpu-val.txt')\" 'BEGIN { exit !(b > a + 1) }'"
done_testing
