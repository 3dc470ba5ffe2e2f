#!/usr/bin/env bash
# Class-prior samples as a Slurm job array: task I of N runs db-prior --shard I/N.
#
#   sbatch --array=0-7 pipelines/prior-slurm.sh OUT_PREFIX DB-PRIOR-OPTIONS...
#   sbatch --array=0-7 pipelines/prior-slurm.sh run/class --model sd15 --prompt "a photo of a dog" -n 200
#   cat run/class.shard-*-of-8.dbt > run/class.dbt      # when the array is done
#
# Task I writes OUT_PREFIX.shard-I-of-N.dbt.  A task that is preempted,
# requeued (--requeue) or simply resubmitted resumes its file where it
# stopped, so rerunning the same array only makes what is missing.  The array
# must start at 0 with step 1 (--array=0-K); N is its task count.
#SBATCH --job-name=db-prior
#SBATCH --cpus-per-task=16
#SBATCH --output=db-prior-%A_%a.log
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: sbatch --array=0-K $0 OUT_PREFIX DB-PRIOR-OPTIONS..." >&2; exit 2; }
: "${SLURM_ARRAY_TASK_ID:?not a Slurm array task (sbatch --array=0-K ...)}"
I=$SLURM_ARRAY_TASK_ID
N=${SLURM_ARRAY_TASK_COUNT:-$((SLURM_ARRAY_TASK_MAX - SLURM_ARRAY_TASK_MIN + 1))}
OUT=$1
shift
exec "${DB_PRIOR:-db-prior}" "$@" --threads "${SLURM_CPUS_PER_TASK:-0}" --shard "$I/$N" -o "$OUT.shard-$I-of-$N.dbt"
