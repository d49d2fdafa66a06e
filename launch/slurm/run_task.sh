#!/usr/bin/env bash
# One SLURM task of a training job: the .sbatch files run `srun ... bash launch/slurm/run_task.sh
# TRAIN_FLAGS...`, which starts `python -m signclip_jax.train TRAIN_FLAGS...` in this task.
#
# With more than one task, signclip_jax/distributed.py calls jax.distributed.initialize(), whose
# SLURM auto-detection reads SLURM_JOB_ID, SLURM_STEP_NODELIST (coordinator: the first node,
# port derived from the job id unless JAX_COORDINATOR_PORT is set), SLURM_NTASKS, SLURM_PROCID
# and SLURM_LOCALID. It then gives each process the one GPU local_device_ids=[SLURM_LOCALID],
# which is right only for one task per GPU with every task seeing all the node's GPUs. So:
#   SIGNCLIP_GPU_MODE=per-gpu (default)  one task per GPU. If SLURM bound a single GPU to the
#       task (--gpus-per-task=1, --gpu-bind), that GPU is local device 0: JAX_LOCAL_DEVICE_IDS=0.
#   SIGNCLIP_GPU_MODE=per-node           one task per node using all its GPUs:
#       JAX_LOCAL_DEVICE_IDS=0,...,N-1 (else each process would see only GPU 0, the known
#       "one GPU per node" pitfall), N from CUDA_VISIBLE_DEVICES, or SLURM_GPUS_ON_NODE where
#       the site does not set CUDA_VISIBLE_DEVICES.
# An explicit JAX_LOCAL_DEVICE_IDS is left alone. SIGNCLIP_TEXT_MODEL: a text model folder staged
# with `python -m signclip_jax.prepare --text_model=NAME --out=FOLDER` on a shared filesystem (or
# gs://): the task trains with --config.model.text_model=FOLDER and HF_HUB_OFFLINE=1, for compute
# nodes without internet. Other settings: SIGNCLIP_REPO (repository root, default: this
# script's), SIGNCLIP_PYTHON (default: SIGNCLIP_VENV/bin/python, SIGNCLIP_VENV defaulting to
# REPO/.venv, else python3).

set -euo pipefail
root=${SIGNCLIP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
cd "$root"
venv=${SIGNCLIP_VENV:-$root/.venv}
python=${SIGNCLIP_PYTHON:-}
if [[ -z $python ]]; then
  if [[ -x $venv/bin/python ]]; then python=$venv/bin/python; else python=python3; fi
fi
mode=${SIGNCLIP_GPU_MODE:-per-gpu}

case $mode in per-gpu | per-node) ;; *)
  echo "error: SIGNCLIP_GPU_MODE must be per-gpu or per-node, got '$mode'" >&2
  exit 2
  ;;
esac
if [[ -z ${JAX_LOCAL_DEVICE_IDS:-} && -z ${CUDA_VISIBLE_DEVICES:-} && $mode == per-node &&
  ${SLURM_GPUS_ON_NODE:-0} =~ ^[1-9][0-9]*$ ]]; then
  # No CUDA_VISIBLE_DEVICES (some sites do not set it): every GPU SLURM gave this node.
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))
  export JAX_LOCAL_DEVICE_IDS
elif [[ -z ${JAX_LOCAL_DEVICE_IDS:-} && -n ${CUDA_VISIBLE_DEVICES:-} ]]; then
  IFS=, read -r -a visible <<<"$CUDA_VISIBLE_DEVICES"
  n=${#visible[@]}
  case $mode in
    per-node) JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((n - 1))); export JAX_LOCAL_DEVICE_IDS ;;
    per-gpu)
      if ((n == 1)); then
        export JAX_LOCAL_DEVICE_IDS=0
      elif [[ -n ${SLURM_NTASKS_PER_NODE:-} && ${SLURM_NTASKS_PER_NODE} != "$n" ]]; then
        echo "warning: $n GPUs visible but $SLURM_NTASKS_PER_NODE tasks per node: JAX will" \
          "use GPU [SLURM_LOCALID] only; use --ntasks-per-node=$n" >&2
      fi
      ;;
  esac
fi
text_model=()
if [[ -n ${SIGNCLIP_TEXT_MODEL:-} ]]; then
  text_model=(--config.model.text_model="$SIGNCLIP_TEXT_MODEL")
  export HF_HUB_OFFLINE=1
fi

echo "[run_task] task ${SLURM_PROCID:-0}/${SLURM_NTASKS:-1} on $(hostname)" \
  "local ${SLURM_LOCALID:-0} CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset}" \
  "JAX_LOCAL_DEVICE_IDS=${JAX_LOCAL_DEVICE_IDS:-auto}" >&2
exec "$python" -m signclip_jax.train ${text_model[@]+"${text_model[@]}"} "$@"
