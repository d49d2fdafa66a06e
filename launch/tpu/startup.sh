#!/bin/bash
# The startup script of a slice (create.sh writes it, with the run's workdir, into the queued
# resource's or VM's metadata as `startup-script`). It runs as root on every worker after each
# (re)provisioning and each reboot, so a re-created spot slice trains again by itself, with no
# watcher:
#   1. code: WORKDIR/launch/code.txt says where (install.sh writes it): "git URL REF" (fetched)
#      or "tar" (WORKDIR/launch/code.tar.gz, this checkout as install.sh packed it);
#   2. environment: launch/setup_env.sh --accelerator=tpu (Python 3.11 venv, jax[tpu], gcsfs);
#   3. training: worker_train.sh --boot starts the run saved in WORKDIR/launch/run.args (train.sh
#      saves it at the first start), on every worker alike; nothing when no run is saved yet.
# install.sh runs it over ssh with SIGNCLIP_INSTALL_ONLY=1 (steps 1 and 2). Log:
# /opt/signclip/logs/startup.log on each worker. SIGNCLIP_ROOT (/opt/signclip) is where
# everything goes; SIGNCLIP_RETRY_S (10) the first wait between retries of a gcloud step.

set -uo pipefail
: "${SIGNCLIP_WORKDIR:?SIGNCLIP_WORKDIR is not set (create.sh writes it at the top)}"
root=${SIGNCLIP_ROOT:-/opt/signclip}
retry_s=${SIGNCLIP_RETRY_S:-10}
export HOME=${HOME:-/root}
launch=$SIGNCLIP_WORKDIR/launch
mkdir -p "$root/logs"
chmod 755 "$root" "$root/logs"
if [[ -z ${SIGNCLIP_STARTUP_TTY:-} ]]; then
  exec >>"$root/logs/startup.log" 2>&1
fi
echo "=== $(date -u '+%Y-%m-%dT%H:%M:%SZ') $(hostname): startup (workdir $SIGNCLIP_WORKDIR)"

# A gcloud step that may meet a network not yet up: 5 tries, waiting longer each time.
retry() {
  local n=1
  until "$@"; do
    if ((n >= 5)); then
      echo "failed 5 times: $*"
      return 1
    fi
    sleep $((retry_s * n * n))
    n=$((n + 1))
  done
}

fail() {
  echo "error: $*"
  exit 1
}

code_txt=$(mktemp)
if ! retry gcloud storage cp "$launch/code.txt" "$code_txt"; then
  echo "no $launch/code.txt: nothing to install yet (install.sh writes it)"
  exit 0
fi
read -r kind url ref <"$code_txt"
rm -f "$code_txt"
dir=$root/signclip-jax
case $kind in
  git)
    if ! { git init -q "$dir" && retry git -C "$dir" fetch -q --depth=1 "$url" "$ref" &&
      git -C "$dir" checkout -q --force FETCH_HEAD; }; then
      fail "cannot fetch $url at $ref"
    fi
    ;;
  tar)
    tarball=$(mktemp)
    retry gcloud storage cp "$launch/code.tar.gz" "$tarball" || fail "cannot copy $launch/code.tar.gz"
    if ! { rm -rf "$dir.new" && mkdir -p "$dir.new" && tar -xzf "$tarball" -C "$dir.new"; }; then
      fail "cannot unpack $launch/code.tar.gz"
    fi
    rm -rf "$dir" && mv "$dir.new" "$dir"
    rm -f "$tarball"
    ;;
  *) fail "$launch/code.txt says '$kind' (expected git or tar)" ;;
esac
echo "code in $dir ($kind)"

retry bash "$dir/launch/setup_env.sh" --accelerator=tpu --apt-python --gcs --venv="$root/venv" ||
  fail "setup_env.sh failed"

if [[ -n ${SIGNCLIP_INSTALL_ONLY:-} ]]; then
  echo "installed (training is started by train.sh or at the next boot)"
  exit 0
fi
SIGNCLIP_VENV=$root/venv SIGNCLIP_ROOT=$root exec bash "$dir/launch/tpu/worker_train.sh" --boot
