#!/usr/bin/env bash
# Creates the Python environment for signclip-jax on an accelerator machine (a TPU worker, where
# launch/tpu/install.sh runs it, or a GPU cluster's login node):
#   1. Python 3.11 (--apt-python: apt-get install python3.11 python3.11-venv when missing;
#      TPU VM images ship Python 3.10, the project needs 3.11+);
#   2. a venv (--venv, default ~/signclip-venv);
#   3. torch from the CPU wheel index at requirements.txt's pin (training never uses torch: it
#      serves the PyTorch twin, convert and the demo MiniLM; a CUDA torch would pull GBs of
#      CUDA libraries next to JAX's own);
#   4. pip install -r requirements.txt "jax[ACCELERATOR]==VERSION" with VERSION taken from the
#      jax[cpu] pin in requirements.txt (tpu: libtpu from PyPI; cuda12 / cuda13: the CUDA
#      plugin with its CUDA libraries from PyPI; cpu: nothing more);
#   5. --gcs: gcsfs, which gs:// workdirs need (etils.epath reads and writes them through it).
#
#   bash launch/setup_env.sh --accelerator=cuda13 --venv=.venv        (in the repository root)
# Options: --accelerator=cpu|tpu|cuda12|cuda13, --venv=DIR, --python=python3.11, --apt-python,
# --gcs, --dry-run. Environment: SIGNCLIP_TORCH_INDEX (CPU wheel index; empty: plain PyPI).

set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

accelerator=""
venv=$HOME/signclip-venv
python=python3.11
apt_python=0
gcs=0
dry_run=0
torch_index=${SIGNCLIP_TORCH_INDEX-https://download.pytorch.org/whl/cpu}
gcsfs_spec="gcsfs==2026.10.1"

die() {
  echo "error: $*" >&2
  exit 2
}
run() {
  if [[ $dry_run == 1 ]]; then
    echo "$*"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

for arg in "$@"; do
  case $arg in
    --accelerator=*) accelerator=${arg#*=} ;;
    --venv=*) venv=${arg#*=} ;;
    --python=*) python=${arg#*=} ;;
    --apt-python) apt_python=1 ;;
    --gcs) gcs=1 ;;
    --dry-run) dry_run=1 ;;
    -h | --help) sed -n '2,/^$/s/^# \{0,1\}//p' "$0"; exit 0 ;;
    *) die "unknown argument $arg (see --help)" ;;
  esac
done
case $accelerator in
  cpu | tpu | cuda12 | cuda13) ;;
  "") die "--accelerator=cpu|tpu|cuda12|cuda13 is required" ;;
  *) die "unknown --accelerator '$accelerator' (cpu, tpu, cuda12, cuda13)" ;;
esac

# The pins live in requirements.txt only.
jax_version=$(sed -n 's/^jax\[cpu\]==\([^ ;#]*\).*/\1/p' requirements.txt)
torch_pin=$(sed -n 's/^\(torch==[^ ;#]*\).*/\1/p' requirements.txt)
[[ -n $jax_version ]] || die "no jax[cpu]==VERSION line in requirements.txt"

if ! command -v "$python" >/dev/null 2>&1; then
  [[ $apt_python == 1 ]] || die "$python not found (install Python 3.11+, or pass --apt-python)"
  # A fresh VM's unattended upgrades may hold the dpkg lock for a while: wait for it.
  run sudo apt-get -o DPkg::Lock::Timeout=600 update -q
  run sudo env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -q \
    "$python" "$python-venv"
fi
if [[ ! -x $venv/bin/python ]]; then
  run "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip)
run "${pip[@]}" install -q --upgrade pip
if [[ -n $torch_pin && -n $torch_index ]]; then
  run "${pip[@]}" install -q "$torch_pin" --index-url "$torch_index"
fi
extra=()
if [[ $accelerator != cpu ]]; then extra+=("jax[$accelerator]==$jax_version"); fi
if [[ $gcs == 1 ]]; then extra+=("$gcsfs_spec"); fi
run "${pip[@]}" install -q -r requirements.txt ${extra[@]+"${extra[@]}"}
run "$venv/bin/python" -c "import jax, signclip_jax; print('jax', jax.__version__, 'installed')"
