#!/usr/bin/env bash
# The GPU code paths of the model code and the tools, run where there is no
# GPU: --device cpu-strict (kernels/ops.h) is the CPU with a GPU's
# discipline (device buffers closed to the host between ops and copies,
# copies checked for direction), so host code that reads a device buffer,
# or a copy the wrong way, fails here instead of on a lent GPU.  The numbers
# are the CPU's, so every result must equal the plain CPU run's bytes.
. "$(dirname "$0")/lib.sh"
train_fixtures
S="--device cpu-strict"

for t in test_unet test_unet_backward test_clip test_vae test_txt2img; do
    ok "$t with DB_TEST_DEVICE=cpu-strict" env DB_TEST_DEVICE=cpu-strict "$B/tests/$t"
done

db-sample -q -m "$M" -p "a photo of a dog" --steps 4 --width 128 --height 128 --seed 1 --latents-out "$T/s-cpu.dbt" -o "$T/s.png"
ok "db-sample $S" db-sample -q -m "$M" -p "a photo of a dog" --steps 4 --width 128 --height 128 --seed 1 $S \
    --latents-out "$T/s-strict.dbt" -o "$T/s2.png"
check "  the same latents as on the CPU" "dbtest dbt-rel '$T/s-cpu.dbt' '$T/s-strict.dbt' | grep -q 'largest relative L2 0$'"
ok "db-sample $S --precision bf16 --grid" db-sample -q -m "$M" -p "a dog" --steps 3 --width 128 --height 128 -n 2 \
    --grid "$T/g.png" $S --precision bf16 -o "$T/b.png"
ok "db-prep $S" db-prep -q -m "$M" --size 128 --caption "a photo of sks dog" $S "$TOP/tests/data/photos/dog" -o "$T/i2.dbt"
check "  the same posteriors as on the CPU" "dbtest dbt-rel '$I' '$T/i2.dbt' | grep -q 'largest relative L2 0$'"
ok "db-prior $S" db-prior -q --model "$M" --prompt "a photo of a dog" -n 2 --steps 3 --width 128 --height 128 $S -o "$T/c2.dbt"

TR="db-train -q -m $M -i $I -c $C --steps 3 --lr 1e-4 --seed 5 --train-text-encoder"
ok "db-train on the CPU" $TR -o "$T/r-cpu"
ok "db-train $S (text encoder, class images)" $TR $S -o "$T/r-strict"
check "  the same weights and moments as on the CPU" \
    "cmp '$T/r-cpu/ckpt-000003/model.safetensors' '$T/r-strict/ckpt-000003/model.safetensors' && cmp '$T/r-cpu/ckpt-000003/optimizer.safetensors' '$T/r-strict/ckpt-000003/optimizer.safetensors'"
ok "db-train $S fp16, adamw8bit, checkpointing, validation, real class photos" \
    db-train -q -m "$M" -i "$I" -c "$I" --steps 2 --lr 1e-4 $S --precision fp16 --optimizer adamw8bit \
    --gradient-checkpointing --validation-prompt "a dog" --validation-every 2 --validation-steps 2 -o "$T/r2"
ok "  and its resume" db-train -q -m "$M" -i "$I" -c "$I" --steps 3 --resume "$T/r2" $S --precision fp16
if command -v mpirun >/dev/null; then
    export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
    TM="db-train -q -m $M -i $I --steps 2 --lr 1e-4 --threads 1"
    ok "mpirun -np 2 on the CPU" mpirun -np 2 $TM -o "$T/m-cpu"
    ok "mpirun -np 2 $S (gradients staged through host memory)" mpirun -np 2 $TM $S -o "$T/m-strict"
    check "  the same weights as on the CPU" "cmp '$T/m-cpu/ckpt-000002/model.safetensors' '$T/m-strict/ckpt-000002/model.safetensors'"
fi
done_testing
