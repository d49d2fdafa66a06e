# shellcheck shell=bash
# Shared by launch/tpu/*.sh (sourced, never run): settings, flag parsing, --dry-run, and the
# gcloud steps (create, install, train, ...) as functions so resume.sh can chain them.
#
# Every setting is a flag, or an environment variable, or a default (flags win):
#   --project      SIGNCLIP_PROJECT       GCP project (required)
#   --zone         SIGNCLIP_ZONE          us-central2-b (the v4 zone; v5e: e.g. us-west4-a)
#   --name         SIGNCLIP_TPU_NAME      signclip (TPU VM name; the queued resource has the same)
#   --accelerator  SIGNCLIP_ACCELERATOR   v4-32 (v4-8, v4-32, v5litepod-16, v6e-16, ...)
#   --runtime      SIGNCLIP_RUNTIME       from the accelerator: tpu-ubuntu2204-base (v2-v4),
#                                         v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
#                                         v2-alpha-tpuv6e (v6e)
#   --capacity     SIGNCLIP_CAPACITY      spot | on-demand | reserved | guaranteed (queued only)
#                                         | best-effort (queued only, gcloud alpha)
#                                         | preemptible (--direct only); default spot
#   --direct       SIGNCLIP_QUEUED=0      `tpu-vm create` instead of a queued resource
#   --bucket       SIGNCLIP_BUCKET        gs://BUCKET or BUCKET; default workdir gs://BUCKET/runs/NAME
#   --workdir      SIGNCLIP_WORKDIR       training workdir (must be gs://)
#   --config       SIGNCLIP_CONFIG        configs/spreadthesign.py
#   --data         SIGNCLIP_DATA          gs:// folder copied to /tmp/signclip-data on every worker
#   --repo         SIGNCLIP_REPO          git URL to clone on the workers; empty: copy this tree
#   --ref          SIGNCLIP_REF           main (branch, tag or commit of --repo)
#   --remote-dir   SIGNCLIP_REMOTE_DIR    signclip-jax (checkout on the workers, under $HOME)
#   --worker       SIGNCLIP_WORKER        0 (logs.sh: which worker; "all" for every one)
#   --wait                                create.sh: wait until the slice is ready
#   --lines=N, --no-follow                logs.sh: how much to show (100), print and exit
#   --watch=SECONDS                       resume.sh: check again every SECONDS, forever
#   --dry-run      SIGNCLIP_DRY_RUN=1     print every command instead of running it
#   -- ARGS...                            train.sh/resume.sh: extra flags for signclip_jax.train
#                                         (the flags above go before --)

# shellcheck disable=SC2034  # some settings are only read by the scripts that source this
PROJECT="${SIGNCLIP_PROJECT:-}"
ZONE="${SIGNCLIP_ZONE:-us-central2-b}"
NAME="${SIGNCLIP_TPU_NAME:-signclip}"
ACCELERATOR="${SIGNCLIP_ACCELERATOR:-v4-32}"
RUNTIME="${SIGNCLIP_RUNTIME:-}"
CAPACITY="${SIGNCLIP_CAPACITY:-spot}"
QUEUED="${SIGNCLIP_QUEUED:-1}"
BUCKET="${SIGNCLIP_BUCKET:-}"
WORKDIR="${SIGNCLIP_WORKDIR:-}"
CONFIG="${SIGNCLIP_CONFIG:-configs/spreadthesign.py}"
DATA="${SIGNCLIP_DATA:-}"
REPO="${SIGNCLIP_REPO:-}"
REF="${SIGNCLIP_REF:-main}"
REMOTE_DIR="${SIGNCLIP_REMOTE_DIR:-signclip-jax}"
WORKER="${SIGNCLIP_WORKER:-0}"
DRY_RUN="${SIGNCLIP_DRY_RUN:-0}"
POLL_S="${SIGNCLIP_POLL_S:-30}"
WAIT=0
FOLLOW=1
LINES=100
WATCH_S=0
EXTRA_ARGS=()

# Where the packed data lands on each worker; configs point data.shards below it.
DATA_LOCAL=/tmp/signclip-data
# The repository this script belongs to (what install.sh copies when no --repo is given).
LOCAL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  # The calling script's header comment, then the shared settings above.
  sed -n '2,/^$/s/^# \{0,1\}//p' "$0"
  sed -n '4,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

parse_args() {
  local arg value
  while (($#)); do
    arg=$1
    shift
    case $arg in
      --) EXTRA_ARGS=("$@"); break ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --wait) WAIT=1; continue ;;
      --direct) QUEUED=0; continue ;;
      --queued) QUEUED=1; continue ;;
      --no-follow) FOLLOW=0; continue ;;
      --*=*) value=${arg#*=}; arg=${arg%%=*} ;;
      --*)
        (($#)) || die "$arg needs a value"
        value=$1
        shift
        ;;
      *) die "unexpected argument '$arg' (train flags go after --)" ;;
    esac
    case $arg in
      --project) PROJECT=$value ;;
      --zone) ZONE=$value ;;
      --name) NAME=$value ;;
      --accelerator | --accelerator-type) ACCELERATOR=$value ;;
      --runtime | --runtime-version | --version) RUNTIME=$value ;;
      --capacity) CAPACITY=$value ;;
      --bucket) BUCKET=$value ;;
      --workdir) WORKDIR=$value ;;
      --config) CONFIG=$value ;;
      --data) DATA=$value ;;
      --repo) REPO=$value ;;
      --ref) REF=$value ;;
      --remote-dir) REMOTE_DIR=$value ;;
      --worker) WORKER=$value ;;
      --lines) LINES=$value ;;
      --watch) WATCH_S=$value ;;
      *) die "unknown flag $arg (see --help)" ;;
    esac
  done
  finish_settings
}

finish_settings() {
  if [[ -z $RUNTIME ]]; then
    case $ACCELERATOR in
      v5litepod-* | v5e-*) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) RUNTIME=v2-alpha-tpuv5 ;;
      v6e-*) RUNTIME=v2-alpha-tpuv6e ;;
      *) RUNTIME=tpu-ubuntu2204-base ;;
    esac
  fi
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  if [[ -z $WORKDIR && -n $BUCKET ]]; then
    WORKDIR="gs://$BUCKET/runs/$NAME"
  fi
  # install.sh runs `rm -rf REMOTE_DIR` on the workers: keep it a plain folder under $HOME.
  [[ -n $REMOTE_DIR && $REMOTE_DIR != /* && $REMOTE_DIR != . && $REMOTE_DIR != *..* ]] ||
    die "--remote-dir must be a folder name under the home directory (got '$REMOTE_DIR')"
  LOC=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=(--project="$PROJECT"); fi
}

need_project() {
  [[ -n $PROJECT ]] || die "--project (or SIGNCLIP_PROJECT) is required"
}

need_workdir() {
  [[ -n $WORKDIR ]] || die "--bucket or --workdir (or SIGNCLIP_BUCKET / SIGNCLIP_WORKDIR) is required"
  # Every worker of a pod writes the same checkpoints, and a preempted VM loses its disk.
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path (got '$WORKDIR')"
  [[ -z $DATA || $DATA == gs://* ]] || die "--data must be a gs:// path (got '$DATA')"
}

# One word, quoted for a POSIX shell only when it needs it (--flag='the value' for flags).
shq() {
  local s=$1 safe='^[A-Za-z0-9_./:=@%+,-]+$'
  if [[ $s =~ $safe ]]; then
    printf '%s' "$s"
  elif [[ $s =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    shq "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

shjoin() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(shq "$word")"
  done
  printf '%s' "$out"
}

# Runs a command, or with --dry-run prints it (one line, shell-quoted) on the script's stdout
# (fd 3, so that commands inside $(...) print there too).
exec 3>&1
run() {
  if [[ $DRY_RUN == 1 ]]; then
    printf '%s\n' "$(shjoin "$@")" >&3
  else
    echo "+ $(shjoin "$@")" >&2
    "$@"
  fi
}

tpu_ssh() {  # WORKER COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

capacity_flags() {
  case $QUEUED:$CAPACITY in
    *:on-demand) ;;
    *:spot) echo --spot ;;
    *:reserved) echo --reserved ;;
    1:guaranteed) echo --guaranteed ;;
    1:best-effort) echo --best-effort ;;
    0:preemptible) echo --preemptible ;;
    1:preemptible) die "--capacity=preemptible needs --direct; queued resources use spot" ;;
    0:*) die "--capacity=$CAPACITY works only with queued resources (drop --direct)" ;;
    *) die "unknown --capacity '$CAPACITY' (spot, on-demand, reserved, guaranteed, best-effort, preemptible)" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Steps.

do_create() {
  local cap gcloud_qr=(gcloud compute tpus queued-resources)
  cap=$(capacity_flags)
  if [[ $QUEUED == 1 ]]; then
    # --best-effort exists only in the alpha track.
    if [[ $CAPACITY == best-effort ]]; then gcloud_qr=(gcloud alpha compute tpus queued-resources); fi
    # shellcheck disable=SC2086  # $cap is zero or one flag
    run "${gcloud_qr[@]}" create "$NAME" "${LOC[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" $cap
    if [[ $WAIT == 1 ]]; then wait_active; fi
  else
    # Blocks until the VM is READY (no --async).
    # shellcheck disable=SC2086
    run gcloud compute tpus tpu-vm create "$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" $cap
  fi
}

# Prints the state: a queued resource's (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, FAILED,
# SUSPENDED, ...) or a direct VM's (READY, PREEMPTED, ...); MISSING when it does not exist.
tpu_state() {
  local state
  if [[ $QUEUED == 1 ]]; then
    set -- gcloud compute tpus queued-resources describe "$NAME" "${LOC[@]}" --format='value(state.state)'
  else
    set -- gcloud compute tpus tpu-vm describe "$NAME" "${LOC[@]}" --format='value(state)'
  fi
  if [[ $DRY_RUN == 1 ]]; then
    run "$@"
    echo ACTIVE
    return 0
  fi
  local err
  err=$(mktemp)
  if state=$("$@" 2>"$err"); then
    rm -f "$err"
    echo "${state:-MISSING}"
  elif grep -q -i "not.found" "$err"; then
    rm -f "$err"
    echo MISSING
  else
    cat "$err" >&2
    rm -f "$err"
    die "cannot read the state of $NAME (the gcloud error is above)"
  fi
}

wait_active() {
  local state
  while true; do
    state=$(tpu_state)
    echo "$NAME: $state" >&2
    case $state in
      ACTIVE | READY) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | MISSING | PREEMPTED | TERMINATED)
        die "$NAME is $state; delete it (delete.sh) and create it again (or run resume.sh)"
        ;;
    esac
    sleep "$POLL_S"
  done
}

# Ships the code to every worker (git clone of --repo at --ref, or a tarball of this tree) and
# runs launch/setup_env.sh there: Python 3.11 venv, requirements.txt, jax[tpu], gcsfs.
do_install() {
  local dir fetch setup
  dir=$(shq "$REMOTE_DIR")
  setup="cd $dir && bash launch/setup_env.sh --accelerator=tpu --apt-python --gcs"
  if [[ -n $REPO ]]; then
    # init + fetch works for a branch, a tag or a commit, and again on a re-install.
    fetch="git init -q $dir && git -C $dir fetch -q --depth=1 $(shq "$REPO") $(shq "$REF")"
    fetch+=" && git -C $dir checkout -q --force FETCH_HEAD"
    tpu_ssh all "set -e; $fetch && $setup"
  else
    local tmp tarball list
    if [[ $DRY_RUN == 1 ]]; then tmp=/tmp/signclip-launch; else tmp=$(mktemp -d); fi
    tarball=$tmp/signclip-jax.tar.gz
    list=$tmp/files
    # Tracked and untracked-but-not-ignored files: what `git status` would show, no venvs.
    if [[ $DRY_RUN == 1 ]]; then
      run git -C "$LOCAL_ROOT" ls-files -z --cached --others --exclude-standard
    else
      git -C "$LOCAL_ROOT" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' f; do
          if [[ -e $LOCAL_ROOT/$f ]]; then printf '%s\0' "$f"; fi
        done >"$list"
    fi
    run tar -czf "$tarball" -C "$LOCAL_ROOT" --null -T "$list"
    if [[ $DRY_RUN != 1 ]]; then echo "code tarball: $(du -h "$tarball" | cut -f1)" >&2; fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:signclip-jax.tar.gz" "${LOC[@]}" --worker=all
    fetch="rm -rf $dir && mkdir -p $dir && tar -xzf signclip-jax.tar.gz -C $dir && rm signclip-jax.tar.gz"
    tpu_ssh all "set -e; $fetch && $setup"
    if [[ $DRY_RUN != 1 ]]; then rm -rf "$tmp"; fi
  fi
}

# Starts training on every worker at once, detached (launch/tpu/worker_train.sh). A worker
# where it already runs leaves it alone, so this is safe to repeat.
do_train() {
  need_workdir
  local env="" args=(--config="$CONFIG" --workdir="$WORKDIR")
  if [[ -n $DATA ]]; then env="SIGNCLIP_DATA_GCS=$(shq "$DATA") SIGNCLIP_DATA_LOCAL=$DATA_LOCAL "; fi
  args+=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  tpu_ssh all "cd $(shq "$REMOTE_DIR") && ${env}bash launch/tpu/worker_train.sh $(shjoin "${args[@]}")"
}

do_stop() {
  tpu_ssh all "cd $(shq "$REMOTE_DIR") && bash launch/tpu/worker_train.sh --stop"
}

do_logs() {
  local tail_cmd
  tail_cmd="tail -n $(shq "$LINES")"
  if [[ $FOLLOW == 1 ]]; then tail_cmd+=" -F"; fi
  tpu_ssh "$WORKER" "$tail_cmd signclip-logs/train.log"
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}
