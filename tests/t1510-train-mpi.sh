#!/usr/bin/env bash
# Data-parallel db-train: `mpirun -np 2 db-train` (each process one
# micro-batch of every step, gradients summed with MPI_Allreduce) against one
# process with --grad-accum 2, which takes the same micro-batches: equal
# within float tolerance (the sums are added in another order; AdamW turns
# roundoff-only gradients, e.g. the key biases, into +-lr steps, so the
# comparison is over all weights together), equal losses, and only rank 0
# writes the run directory.
. "$(dirname "$0")/lib.sh"
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
if ! command -v mpirun >/dev/null; then
    echo "1..0 # SKIP mpirun not installed (make deps installs openmpi-bin)"
    exit 0
fi
# OpenMPI refuses root unless told (CI containers run as root); several
# processes may share the 2 cores
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
train_fixtures
TR="db-train -q --model $M --instance $I --class $C --lr 1e-4 --seed 3 --threads 1 --train-text-encoder --steps 4 --save-every 2"
PY=/usr/bin/python3

ok "one process, --grad-accum 2" $TR --grad-accum 2 -o "$T/one"
ok "mpirun -np 2" mpirun -np 2 $TR -o "$T/two"
check "rank 0 alone wrote: two checkpoints, one event file" \
    "[ \"\$(cd '$T/two' && ls -d ckpt-* | tr '\n' ' ')\" = 'ckpt-000002 ckpt-000004 ' ] && [ \$(ls '$T/two'/events.out.tfevents.* | wc -l) = 1 ]"
check "weights equal within rel L2 1e-5" $PY "$TOP/tests/py/st_compare.py" "$T/one/ckpt-000004/model.safetensors" \
    "$T/two/ckpt-000004/model.safetensors" 1e-5
check "moments equal within rel L2 1e-5" $PY "$TOP/tests/py/st_compare.py" "$T/one/ckpt-000004/optimizer.safetensors" \
    "$T/two/ckpt-000004/optimizer.safetensors" 1e-5
cat >"$T/loss.py" <<'PY'
import json, sys
a, b = (json.load(open(f))["loss"] for f in sys.argv[1:3])
print(a, b)
sys.exit(0 if all(abs(a[k] - b[k]) <= 1e-6 * abs(a[k]) for k in ("loss", "loss_instance", "loss_prior")) else 1)
PY
check "losses equal within 1e-6" $PY "$T/loss.py" "$T/one/ckpt-000004/state.json" "$T/two/ckpt-000004/state.json"
check "the check can fail: a single process without accumulation differs" \
    "$TR --grad-accum 1 -o '$T/acc1' 2>/dev/null && ! $PY '$TOP/tests/py/st_compare.py' '$T/one/ckpt-000004/model.safetensors' '$T/acc1/ckpt-000004/model.safetensors' 1e-5 >/dev/null"
check "the run records its 2 processes" "grep -q '\"processes\": 2' '$T/two/ckpt-000004/state.json'"
fails_with 1 "trained by 2 processes" "a resume with another process count is refused" $TR --steps 6 --resume "$T/two"
ok "a resume with 2 processes continues" mpirun -np 2 $TR --steps 6 --resume "$T/two"
check "ckpt-000006 written" "[ -d '$T/two/ckpt-000006' ]"
mpirun -np 2 ${TR/-q/-v} --steps 1 -o "$T/v" >"$T/v.log" 2>&1
check "rank 0 says how gradients are summed (CPU: MPI)" "grep -q 'process 0 of 2 on cpu, gradients summed over mpi' '$T/v.log'"
# --device cuda under mpirun: each process takes the GPU of its local rank.
# Here there is none, so each names the device it tried, into a file of
# its own; whichever fails first aborts the job, so the other may not get
# to say it: each file that names a device names its rank's, and one does.
# (Waiting in rank 0 cannot order them: both meet in MPI_Init first.)
mpirun -np 2 sh -c "exec \"\$@\" 2>'$T/cu.rank'\$OMPI_COMM_WORLD_RANK" sh \
    $TR --device cuda -o "$T/cu" >"$T/cu.log" 2>&1
named() { grep -qs "context: cuda:" "$T/cu.rank$1"; }
check "mpirun -np 2 --device cuda: each process asks for the GPU of its rank" \
    "{ named 0 || named 1; } && { ! named 0 || grep -q 'context: cuda:0' '$T/cu.rank0'; } &&
     { ! named 1 || grep -q 'context: cuda:1' '$T/cu.rank1'; }"
check "... and writes no run" "[ ! -e '$T/cu/ckpt-000002' ]"
fails_with 2 "one process" "--record under mpirun is refused" mpirun -np 2 $TR --record "$T/d.dbt" -o "$T/rec"
done_testing
