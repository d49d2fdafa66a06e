#!/usr/bin/env bash
# Submits a training job as a chain of N sbatch jobs, each starting when the previous one ends
# (--dependency=afterany), so a run longer than the cluster's time limit continues by itself:
# every job resumes from the last checkpoint in the workdir.
#   bash launch/slurm/submit.sh [--chain=N] [--dry-run] FILE.sbatch [TRAIN_FLAGS...]
#   SIGNCLIP_WORKDIR=/scratch/$USER/runs/st bash launch/slurm/submit.sh --chain=4 \
#       launch/slurm/multi_node.sbatch --config.data.csv_path=...
# Prints the job ids. sbatch options go in SIGNCLIP_SBATCH_ARGS (e.g. "--nodes=4 --time=12:00:00").

set -euo pipefail
chain=1
dry_run=0
while (($#)); do
  case $1 in
    --chain=*) chain=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) break ;;
  esac
  shift
done
if (($# == 0)); then
  echo "error: which .sbatch file? (see --help)" >&2
  exit 2
fi
script=$1
shift
[[ -f $script ]] || { echo "error: $script does not exist" >&2; exit 2; }
[[ $chain =~ ^[1-9][0-9]*$ ]] || { echo "error: --chain must be a positive integer" >&2; exit 2; }
# shellcheck disable=SC2206  # word splitting of the options string is intended
sbatch_args=(${SIGNCLIP_SBATCH_ARGS:-})

previous=""
for ((i = 1; i <= chain; i++)); do
  cmd=(sbatch --parsable ${sbatch_args[@]+"${sbatch_args[@]}"})
  if [[ -n $previous ]]; then cmd+=(--dependency="afterany:$previous"); fi
  cmd+=("$script" "$@")
  if [[ $dry_run == 1 ]]; then
    echo "${cmd[*]}"
    previous="JOB$i"
  else
    # --parsable prints "jobid" or "jobid;cluster".
    previous=$("${cmd[@]}")
    previous=${previous%%;*}
    echo "$previous"
  fi
done
