# shellcheck shell=bash
# Shared by launch/tpu/*.sh (sourced, never run): settings, the run record, flag parsing,
# --dry-run, and the gcloud steps (create, install, train, ...) as functions.
#
# Every setting is a flag, else an environment variable, else what create.sh recorded for the
# slice (zone, project, accelerator, ...: ~/.config/signclip-launch/NAME.env), else a default:
#   --project      SIGNCLIP_PROJECT       GCP project (required)
#   --name         SIGNCLIP_TPU_NAME      the slice (TPU VM and queued resource); default: the
#                                         last one create.sh made, else signclip
#   --accelerator  SIGNCLIP_ACCELERATOR   v4-32 (v4-8, v5litepod-16, v5p-8, v6e-8, ...)
#   --zone         SIGNCLIP_ZONE          default: the first zone of the accelerator's generation
#                                         in the table below (from the Cloud TPU "TPU regions and
#                                         zones" page, https://cloud.google.com/tpu/docs/regions-zones)
#                                           v6e  us-central1-b us-east1-d us-east5-a us-east5-b
#                                                europe-west4-a
#                                           v5p  us-central1-a us-east5-a
#                                           v5e  us-central1-a us-south1-a us-west1-c us-west4-a
#                                           v4   us-central2-b
#   --runtime      SIGNCLIP_RUNTIME       from the accelerator: tpu-ubuntu2204-base (v2-v4),
#                                         v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
#                                         v2-alpha-tpuv6e (v6e)
#   --capacity     SIGNCLIP_CAPACITY      spot | on-demand | reserved | guaranteed (queued only)
#                                         | best-effort (queued only, gcloud alpha)
#                                         | preemptible (--direct only); default spot
#   --direct       SIGNCLIP_QUEUED=0      `tpu-vm create` instead of a queued resource
#   --valid-until  SIGNCLIP_VALID_UNTIL   24h: a queued request not granted by then expires
#                                         (--valid-until-duration), and --wait gives up
#   --autocheckpoint                      create with Cloud TPU Autocheckpoint (gcloud alpha,
#                                         preview): SIGTERM before maintenance, the trainer saves
#   --bucket       SIGNCLIP_BUCKET        gs://BUCKET or BUCKET (create.sh makes it in the
#                                         slice's region); default workdir gs://BUCKET/runs/NAME
#   --workdir      SIGNCLIP_WORKDIR       training workdir (must be gs://)
#   --repo         SIGNCLIP_REPO          git URL the workers fetch; empty: this tree (tarball)
#   --ref          SIGNCLIP_REF           main (branch, tag or commit of --repo)
# What a run trains with (train.sh saves it in WORKDIR/launch/run.args at the first start;
# resume.sh and every worker's startup script reuse it; a different one is refused):
#   --config       SIGNCLIP_CONFIG        configs/spreadthesign.py
#   --data         SIGNCLIP_DATA          gs:// folder of packed splits (prepare --out=.../SPLIT)
#   --data-mode    SIGNCLIP_DATA_MODE     copy (each worker copies --splits to its disk) | fuse
#                                         (gcsfuse mount, read in place)
#   --splits       SIGNCLIP_SPLITS        train,val (what training reads; test is for evaluate)
#   --text-model   SIGNCLIP_TEXT_MODEL    staged text model folder (prepare --text_model): the
#                                         workers load it with the hub offline
#   -- ARGS...                            train.sh/resume.sh: flags for signclip_jax.train
# Other:
#   --worker       SIGNCLIP_WORKER        0 (logs.sh: which worker; "all" for every one)
#   --wait                                create.sh/resume.sh: wait until the slice is ready
#   --lines=N, --no-follow                logs.sh: how much to show (100), print and exit
#   --watch=SECONDS                       resume.sh: check again every SECONDS
#   --max-failures=N                      resume.sh --watch: give up after N failed checks in a
#                                         row (10); each retry waits longer (backoff)
#   --dry-run      SIGNCLIP_DRY_RUN=1     print every command instead of running it
#                  SIGNCLIP_STATE_DIR     where the records live (~/.config/signclip-launch)

DRY_RUN="${SIGNCLIP_DRY_RUN:-0}"
POLL_S="${SIGNCLIP_POLL_S:-30}"
STATE_DIR="${SIGNCLIP_STATE_DIR:-${XDG_CONFIG_HOME:-$HOME/.config}/signclip-launch}"
WAIT=0
FOLLOW=1
LINES=100
WATCH_S=0
MAX_FAILURES=10
AUTOCHECKPOINT=0
CREATING=0  # create.sh sets it: a new record may replace the old one
EXTRA_ARGS=()
HAVE_EXTRA=0
declare -A FLAG=()
declare -A REC=()

# Everything the workers keep lives under one root-owned folder (the startup script runs as
# root): code, venv, logs, staged data, gcsfuse mounts.
REMOTE_ROOT=/opt/signclip
REMOTE_CODE=$REMOTE_ROOT/signclip-jax
# The repository this script belongs to (what install.sh packs when no --repo is given).
LOCAL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

die() {
  echo "error: $*" >&2
  exit 2
}

warn() {
  echo "warning: $*" >&2
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
      --) EXTRA_ARGS=("$@"); HAVE_EXTRA=1; break ;;
      -h | --help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; continue ;;
      --wait) WAIT=1; continue ;;
      --direct) FLAG[queued]=0; continue ;;
      --queued) FLAG[queued]=1; continue ;;
      --no-follow) FOLLOW=0; continue ;;
      --autocheckpoint) AUTOCHECKPOINT=1; continue ;;
      --*=*) value=${arg#*=}; arg=${arg%%=*} ;;
      --*)
        (($#)) || die "$arg needs a value"
        value=$1
        shift
        ;;
      *) die "unexpected argument '$arg' (train flags go after --)" ;;
    esac
    case $arg in
      --project | --zone | --name | --capacity | --bucket | --workdir | --config | --data | \
        --repo | --ref | --worker | --splits)
        FLAG[${arg#--}]=$value
        ;;
      --accelerator | --accelerator-type) FLAG[accelerator]=$value ;;
      --runtime | --runtime-version | --version) FLAG[runtime]=$value ;;
      --data-mode) FLAG[data_mode]=$value ;;
      --text-model) FLAG[text_model]=$value ;;
      --valid-until) FLAG[valid_until]=$value ;;
      --lines) LINES=$value ;;
      --watch) WATCH_S=$value ;;
      --max-failures) MAX_FAILURES=$value ;;
      *) die "unknown flag $arg (see --help)" ;;
    esac
  done
  finish_settings
}

# The record of slice NAME: KEY=VALUE lines (a dry run keeps its own, so it changes nothing
# that real runs read).
record_file() {
  if [[ $DRY_RUN == 1 ]]; then echo "$STATE_DIR/$1.dry-run.env"; else echo "$STATE_DIR/$1.env"; fi
}

load_record() {
  local file key value
  file=$(record_file "$1")
  if [[ $DRY_RUN == 1 && ! -f $file ]]; then file=$STATE_DIR/$1.env; fi
  [[ -f $file ]] || return 0
  RECORD_FILE=$file
  while IFS='=' read -r key value; do
    if [[ -n $key && $key != \#* ]]; then REC[$key]=$value; fi
  done <"$file"
}

save_record() {
  local file tmp
  mkdir -p "$STATE_DIR"
  file=$(record_file "$NAME")
  tmp=$(mktemp "$STATE_DIR/.record.XXXXXX")
  {
    echo "# slice $NAME, written by launch/tpu/create.sh; read by the other launch/tpu scripts"
    echo "project=$PROJECT"
    echo "zone=$ZONE"
    echo "accelerator=$ACCELERATOR"
    echo "runtime=$RUNTIME"
    echo "capacity=$CAPACITY"
    echo "queued=$QUEUED"
    echo "bucket=$BUCKET"
    echo "workdir=$WORKDIR"
    echo "repo=$REPO"
    echo "ref=$REF"
  } >"$tmp"
  mv "$tmp" "$file"
  if [[ $DRY_RUN == 1 ]]; then echo "$NAME" >"$STATE_DIR/current.dry-run"; else echo "$NAME" >"$STATE_DIR/current"; fi
  echo "recorded the settings of $NAME in $file" >&2
}

# A setting: the flag, else the environment variable, else the record, else the default.
# Sets SOURCE to where it came from.
pick() {  # KEY ENV_NAME DEFAULT
  local key=$1 env=$2 default=$3
  if [[ -n ${FLAG[$key]+x} ]]; then
    SOURCE=flag
    printf '%s' "${FLAG[$key]}"
  elif [[ -n ${!env:-} ]]; then
    SOURCE="env"
    printf '%s' "${!env}"
  elif [[ -n ${REC[$key]+x} ]]; then
    SOURCE=record
    printf '%s' "${REC[$key]}"
  else
    SOURCE=default
    printf '%s' "$default"
  fi
}

generation() {  # ACCELERATOR -> v6e | v5p | v5e | v4 | v3 | v2 | ""
  case $1 in
    v6e-*) echo v6e ;;
    v5p-*) echo v5p ;;
    v5litepod-* | v5e-*) echo v5e ;;
    v4-*) echo v4 ;;
    v3-*) echo v3 ;;
    v2-*) echo v2 ;;
  esac
}

# The zones that offer a generation (https://cloud.google.com/tpu/docs/regions-zones; Asia and
# the other v5e/v5p zones of Europe are on that page: pass --zone for them).
zones_for() {
  case $(generation "$1") in
    v6e) echo us-central1-b us-east1-d us-east5-a us-east5-b europe-west4-a ;;
    v5p) echo us-central1-a us-east5-a ;;
    v5e) echo us-central1-a us-south1-a us-west1-c us-west4-a ;;
    v4) echo us-central2-b ;;
  esac
}

finish_settings() {
  local zones source_zone source_project
  NAME=${FLAG[name]:-${SIGNCLIP_TPU_NAME:-}}
  if [[ -z $NAME ]]; then
    NAME=signclip
    local current=$STATE_DIR/current
    if [[ $DRY_RUN == 1 && -f $STATE_DIR/current.dry-run ]]; then current=$STATE_DIR/current.dry-run; fi
    if [[ -f $current ]]; then NAME=$(<"$current"); fi
  fi
  RECORD_FILE=""
  if [[ $CREATING != 1 ]]; then load_record "$NAME"; fi
  PROJECT=$(pick project SIGNCLIP_PROJECT "")
  source_project=$(pick project SIGNCLIP_PROJECT "" >/dev/null; echo "$SOURCE")
  ACCELERATOR=$(pick accelerator SIGNCLIP_ACCELERATOR v4-32)
  ZONE=$(pick zone SIGNCLIP_ZONE "")
  source_zone=$(pick zone SIGNCLIP_ZONE "" >/dev/null; echo "$SOURCE")
  RUNTIME=$(pick runtime SIGNCLIP_RUNTIME "")
  CAPACITY=$(pick capacity SIGNCLIP_CAPACITY spot)
  QUEUED=$(pick queued SIGNCLIP_QUEUED 1)
  BUCKET=$(pick bucket SIGNCLIP_BUCKET "")
  WORKDIR=$(pick workdir SIGNCLIP_WORKDIR "")
  REPO=$(pick repo SIGNCLIP_REPO "")
  REF=$(pick ref SIGNCLIP_REF main)
  CONFIG=$(pick config SIGNCLIP_CONFIG configs/spreadthesign.py)
  DATA=$(pick data SIGNCLIP_DATA "")
  DATA_MODE=$(pick data_mode SIGNCLIP_DATA_MODE copy)
  SPLITS=$(pick splits SIGNCLIP_SPLITS train,val)
  TEXT_MODEL=$(pick text_model SIGNCLIP_TEXT_MODEL "")
  VALID_UNTIL=$(pick valid_until SIGNCLIP_VALID_UNTIL 24h)
  WORKER=$(pick worker SIGNCLIP_WORKER 0)

  # The zone follows the accelerator; another script of the run uses the recorded one.
  zones=$(zones_for "$ACCELERATOR")
  if [[ $source_zone != record && -n ${REC[zone]:-} && -n $ZONE && $ZONE != "${REC[zone]}" ]]; then
    die "slice $NAME is in zone ${REC[zone]} ($RECORD_FILE), not $ZONE: drop --zone/SIGNCLIP_ZONE (or use another --name)"
  fi
  if [[ $source_project != record && -n ${REC[project]:-} && -n $PROJECT && $PROJECT != "${REC[project]}" ]]; then
    die "slice $NAME belongs to project ${REC[project]} ($RECORD_FILE), not $PROJECT: drop --project/SIGNCLIP_PROJECT (or use another --name)"
  fi
  if [[ -z $ZONE ]]; then
    [[ -n $zones ]] || die "--zone is required for $ACCELERATOR (see https://cloud.google.com/tpu/docs/regions-zones)"
    ZONE=${zones%% *}
    if [[ $CREATING == 1 ]]; then
      echo "zone $ZONE: the first $(generation "$ACCELERATOR") zone launch knows (others: ${zones#* }; --zone to choose)" >&2
    fi
  elif [[ $CREATING == 1 && -n $zones && " $zones " != *" $ZONE "* ]]; then
    warn "$ZONE is not among the $(generation "$ACCELERATOR") zones launch knows ($zones); gcloud refuses it if it offers no $(generation "$ACCELERATOR")"
  fi
  REGION=${ZONE%-*}

  if [[ -z $RUNTIME ]]; then
    case $(generation "$ACCELERATOR") in
      v5e) RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p) RUNTIME=v2-alpha-tpuv5 ;;
      v6e) RUNTIME=v2-alpha-tpuv6e ;;
      *) RUNTIME=tpu-ubuntu2204-base ;;
    esac
  fi
  BUCKET=${BUCKET#gs://}
  BUCKET=${BUCKET%/}
  if [[ -z $WORKDIR && -n $BUCKET ]]; then
    WORKDIR="gs://$BUCKET/runs/$NAME"
  fi
  WORKDIR=${WORKDIR%/}
  if [[ -z $BUCKET && $WORKDIR == gs://* ]]; then
    BUCKET=${WORKDIR#gs://}
    BUCKET=${BUCKET%%/*}
  fi
  case $DATA_MODE in copy | fuse) ;; *) die "--data-mode must be copy or fuse (got '$DATA_MODE')" ;; esac
  [[ $MAX_FAILURES =~ ^[1-9][0-9]*$ ]] || die "--max-failures must be a positive integer"
  [[ $WATCH_S =~ ^[0-9]+$ ]] || die "--watch must be a number of seconds"
  LOC=(--zone="$ZONE")
  if [[ -n $PROJECT ]]; then LOC+=(--project="$PROJECT"); fi
}

need_project() {
  if [[ -z $PROJECT && $DRY_RUN == 1 ]]; then
    warn "no --project (or SIGNCLIP_PROJECT): the commands below use gcloud's default project"
    return 0
  fi
  [[ -n $PROJECT ]] || die "--project (or SIGNCLIP_PROJECT) is required"
}

need_workdir() {
  [[ -n $WORKDIR ]] || die "--bucket or --workdir (or SIGNCLIP_BUCKET / SIGNCLIP_WORKDIR) is required"
  # Every worker of a pod writes the same checkpoints, and a preempted VM loses its disk.
  [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path (got '$WORKDIR')"
  [[ -z $DATA || $DATA == gs://* ]] || die "--data must be a gs:// path (got '$DATA')"
  [[ -z $TEXT_MODEL || $TEXT_MODEL == gs://* ]] ||
    die "--text-model must be a gs:// folder staged with prepare --text_model (got '$TEXT_MODEL')"
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

# A duration such as 90m, 24h, 2d (gcloud's --valid-until-duration) in seconds.
duration_s() {
  local d=$1
  case $d in
    *s) echo "${d%s}" ;;
    *m) echo $((${d%m} * 60)) ;;
    *h) echo $((${d%h} * 3600)) ;;
    *d) echo $((${d%d} * 86400)) ;;
    *) return 1 ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# The startup script: launch/tpu/startup.sh with this run's workdir written in. It runs as root
# on every worker after each (re)provisioning or reboot: installs the code and the environment,
# then starts training with the flags saved in the workdir, on every worker, with no watcher.

startup_file() {
  echo "$STATE_DIR/$NAME.startup.sh"
}

write_startup_script() {
  local file
  file=$(startup_file)
  mkdir -p "$STATE_DIR"
  {
    echo "#!/bin/bash"
    echo "# signclip-jax startup script of slice $NAME (launch/tpu/create.sh wrote it)."
    echo ": \"\${SIGNCLIP_WORKDIR:=$WORKDIR}\""
    echo "export SIGNCLIP_WORKDIR"
    sed '1d' "$LOCAL_ROOT/launch/tpu/startup.sh"
  } >"$file.tmp"
  mv "$file.tmp" "$file"
  echo "$file"
}

# ---------------------------------------------------------------------------------------------
# Steps.

# The workdir's bucket, made in the slice's region when missing (data and checkpoints then
# travel inside one region: no egress charges, lower latency).
ensure_bucket() {
  local location err
  [[ -n $BUCKET ]] || return 0
  if [[ $DRY_RUN == 1 ]]; then
    run gcloud storage buckets describe "gs://$BUCKET" --format='value(location)'
    echo "# if it does not exist:" >&3
    run gcloud storage buckets create "gs://$BUCKET" --location="$REGION" --uniform-bucket-level-access
    return 0
  fi
  err=$(mktemp)
  if location=$(gcloud storage buckets describe "gs://$BUCKET" --format='value(location)' 2>"$err"); then
    if [[ ${location,,} != "${REGION,,}" ]]; then
      warn "bucket gs://$BUCKET is in ${location:-?}, the slice in $REGION: reads and writes cross regions (slower; egress may be charged)"
    fi
  elif grep -q -i -E "not.?found|404" "$err"; then
    run gcloud storage buckets create "gs://$BUCKET" --location="$REGION" --uniform-bucket-level-access
  else
    cat "$err" >&2
    rm -f "$err"
    die "cannot read bucket gs://$BUCKET (the gcloud error is above)"
  fi
  rm -f "$err"
}

do_create() {
  local cap gcloud_qr=(gcloud compute tpus queued-resources) gcloud_vm=(gcloud compute tpus tpu-vm)
  local extra=()
  cap=$(capacity_flags)
  duration_s "$VALID_UNTIL" >/dev/null || die "--valid-until must look like 90m, 24h or 2d (got '$VALID_UNTIL')"
  if [[ -n $WORKDIR ]]; then
    extra+=(--metadata-from-file=startup-script="$(write_startup_script)")
  else
    warn "no --bucket/--workdir: $NAME gets no startup script (it will not install or train by itself)"
  fi
  if [[ $AUTOCHECKPOINT == 1 ]]; then
    # Preview: only in the alpha track.
    gcloud_qr=(gcloud alpha compute tpus queued-resources)
    gcloud_vm=(gcloud alpha compute tpus tpu-vm)
    extra+=(--autocheckpoint-enabled)
  fi
  if [[ $QUEUED == 1 ]]; then
    # --best-effort exists only in the alpha track.
    if [[ $CAPACITY == best-effort ]]; then gcloud_qr=(gcloud alpha compute tpus queued-resources); fi
    # shellcheck disable=SC2086  # $cap is zero or one flag
    run "${gcloud_qr[@]}" create "$NAME" "${LOC[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" $cap \
      --valid-until-duration="$VALID_UNTIL" ${extra[@]+"${extra[@]}"}
    if [[ $WAIT == 1 ]]; then wait_active; fi
  else
    # Blocks until the VM is READY (no --async).
    # shellcheck disable=SC2086
    run "${gcloud_vm[@]}" create "$NAME" "${LOC[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$RUNTIME" $cap ${extra[@]+"${extra[@]}"}
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

# Waits until the slice is ACTIVE/READY, at most --valid-until (the queued request expires
# then anyway).
wait_active() {
  local state deadline
  deadline=$((SECONDS + $(duration_s "$VALID_UNTIL")))
  while true; do
    state=$(tpu_state)
    echo "$NAME: $state" >&2
    case $state in
      ACTIVE | READY) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | MISSING | PREEMPTED | TERMINATED)
        die "$NAME is $state; delete it (delete.sh) and create it again (or run resume.sh)"
        ;;
    esac
    ((SECONDS < deadline)) || die "$NAME is still $state after --valid-until=$VALID_UNTIL"
    sleep "$POLL_S"
  done
}

# gs:// object helpers (gcloud storage): copy a local file up, print an object (rc 3 when it
# does not exist, 1 on another error, whose message goes to stderr).
gcs_put() {  # LOCAL_FILE URL
  run gcloud storage cp "$1" "$2"
}

gcs_cat() {  # URL
  local err out
  err=$(mktemp)
  if out=$(gcloud storage cat "$1" 2>"$err"); then
    rm -f "$err"
    printf '%s\n' "$out"
    return 0
  fi
  if grep -q -i -E "matched no objects|not.?found|404|no urls matched" "$err"; then
    rm -f "$err"
    return 3
  fi
  cat "$err" >&2
  rm -f "$err"
  return 1
}

# Publishes the code for the workers (WORKDIR/launch/code.txt: "git URL REF", or "tar" with
# WORKDIR/launch/code.tar.gz: this tree's tracked and untracked-but-not-ignored files), then
# runs the startup script on every worker now, without starting training: what a fresh slice
# does by itself at boot. Re-running it updates the code and the environment.
do_install() {
  need_workdir
  local tmp tarball list startup
  if [[ $DRY_RUN == 1 ]]; then tmp=/tmp/signclip-launch; else tmp=$(mktemp -d); fi
  if [[ -n $REPO ]]; then
    if [[ $DRY_RUN != 1 ]]; then printf 'git %s %s\n' "$REPO" "$REF" >"$tmp/code.txt"; fi
  else
    tarball=$tmp/code.tar.gz
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
    gcs_put "$tarball" "$WORKDIR/launch/code.tar.gz"
    if [[ $DRY_RUN != 1 ]]; then echo tar >"$tmp/code.txt"; fi
  fi
  gcs_put "$tmp/code.txt" "$WORKDIR/launch/code.txt"
  startup=$(write_startup_script)
  run gcloud compute tpus tpu-vm scp "$startup" "$NAME:signclip-startup.sh" "${LOC[@]}" --worker=all
  tpu_ssh all "sudo SIGNCLIP_INSTALL_ONLY=1 SIGNCLIP_STARTUP_TTY=1 bash signclip-startup.sh"
  if [[ $DRY_RUN != 1 ]]; then rm -rf "$tmp"; fi
}

# ---------------------------------------------------------------------------------------------
# The run: what worker_train.sh is given, saved once in WORKDIR/launch/run.args (one argument
# per line): worker options, "--", then the trainer's flags.

RUN_ARGS_NAME=launch/run.args

# The run these settings describe (RUN), from the flags of this command.
compose_run() {
  local trainer=(--config="$CONFIG" --workdir="$WORKDIR") arg has_cache=0 has_shards=0 root
  for arg in ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"}; do
    [[ $arg != *$'\n'* ]] || die "a trainer flag holds a newline: $(shq "$arg")"
    case $arg in
      --config.compilation_cache_dir=*) has_cache=1 ;;
      --config.data.shards=*) has_shards=1 ;;
    esac
  done
  RUN=()
  if [[ -n $DATA ]]; then
    RUN+=(--data="$DATA" --data-mode="$DATA_MODE" --splits="$SPLITS")
    if [[ $has_shards == 0 ]]; then
      # Where the worker puts (copy) or mounts (fuse) the splits.
      if [[ $DATA_MODE == copy ]]; then
        root=$REMOTE_ROOT/data
      else
        root=$REMOTE_ROOT/gcs/${DATA#gs://}
      fi
      trainer+=(--config.data.source=packed "--config.data.shards=$root/{split}")
    fi
  fi
  if [[ -n $TEXT_MODEL ]]; then
    RUN+=(--hub-offline)
    trainer+=(--config.model.text_model="$TEXT_MODEL")
  fi
  # Compiled programs survive a re-created slice in the bucket (local disks do not).
  if [[ $has_cache == 0 && -n $BUCKET ]]; then
    trainer+=(--config.compilation_cache_dir="gs://$BUCKET/jax_cache")
  fi
  RUN+=(-- "${trainer[@]}" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
}

# Whether this command said what to train (else the saved run is reused as it is).
run_given() {
  [[ $HAVE_EXTRA == 1 || -n ${FLAG[config]+x} || -n ${FLAG[data]+x} || -n ${FLAG[data_mode]+x} ||
    -n ${FLAG[splits]+x} || -n ${FLAG[text_model]+x} ]]
}

dry_run_args_file() {
  local key=${WORKDIR#gs://}
  echo "$STATE_DIR/dry-run/${key//\//_}.args"
}

# SAVED: the run saved in the workdir (empty array when none). A dry run reads what an earlier
# dry run "saved" (kept locally, nothing was written to the bucket).
read_saved_run() {
  local text rc=0
  SAVED=()
  if [[ $DRY_RUN == 1 ]]; then
    local file
    file=$(dry_run_args_file)
    if [[ -f $file ]]; then mapfile -t SAVED <"$file"; fi
    return 0
  fi
  text=$(gcs_cat "$WORKDIR/$RUN_ARGS_NAME") || rc=$?
  case $rc in
    0) mapfile -t SAVED <<<"$text" ;;
    3) ;;
    *) die "cannot read $WORKDIR/$RUN_ARGS_NAME (the gcloud error is above)" ;;
  esac
}

save_run() {
  local tmp
  if [[ $DRY_RUN == 1 ]]; then
    local file
    file=$(dry_run_args_file)
    mkdir -p "$(dirname "$file")"
    printf '%s\n' "${RUN[@]}" >"$file"
    run gcloud storage cp /tmp/signclip-launch/run.args "$WORKDIR/$RUN_ARGS_NAME"
    return 0
  fi
  tmp=$(mktemp)
  printf '%s\n' "${RUN[@]}" >"$tmp"
  gcs_put "$tmp" "$WORKDIR/$RUN_ARGS_NAME"
  rm -f "$tmp"
  echo "saved the run's flags in $WORKDIR/$RUN_ARGS_NAME" >&2
}

# RUN := the run to start: the saved one, or (first start) this command's, saved now. A
# command whose run differs from the saved one is refused: one workdir, one run.
settle_run() {
  read_saved_run
  if ((${#SAVED[@]})); then
    if run_given; then
      compose_run
      if [[ "$(printf '%s\n' "${RUN[@]}")" != "$(printf '%s\n' "${SAVED[@]}")" ]]; then
        die "$WORKDIR was started with: $(shjoin "${SAVED[@]}"); this command asks for: $(shjoin "${RUN[@]}"). Give the same flags or none (to reuse the saved ones), or another --workdir"
      fi
    fi
    RUN=("${SAVED[@]}")
  else
    if [[ ${1:-} == saved-only ]] && ! run_given; then
      die "no run saved in $WORKDIR ($RUN_ARGS_NAME): start it with train.sh first"
    fi
    compose_run
    save_run
  fi
}

# worker_train.sh on every worker, as root (it lives under REMOTE_ROOT).
worker_cmd() {
  printf 'sudo bash %s/launch/tpu/worker_train.sh %s' "$REMOTE_CODE" "$*"
}

# Starts the run on every worker: all workers or none. Workers report their state first; when
# only some run (one died, or restarted alone), all are stopped and all started again, since
# a lone process cannot rejoin the others.
do_train() {
  need_workdir
  settle_run "${1:-}"
  local out running=0 stopped=0
  if [[ $DRY_RUN == 1 ]]; then
    tpu_ssh all "$(worker_cmd --status)"
  else
    out=$(tpu_ssh all "$(worker_cmd --status)") || die "cannot reach every worker of $NAME (see above)"
    running=$(grep -c '^signclip-status .* running$' <<<"$out" || true)
    stopped=$(grep -c '^signclip-status .* stopped$' <<<"$out" || true)
  fi
  if ((running > 0 && stopped == 0)); then
    echo "training runs on all $running worker(s) of $NAME" >&2
    return 0
  fi
  if ((running > 0)); then
    echo "training runs on $running worker(s) of $NAME but not on $stopped: restarting all" >&2
    tpu_ssh all "$(worker_cmd --stop --wait)"
  fi
  tpu_ssh all "$(worker_cmd start "$(shjoin "${RUN[@]}")")"
}

do_stop() {
  tpu_ssh all "$(worker_cmd --stop)"
}

do_logs() {
  local tail_cmd
  tail_cmd="tail -n $(shq "$LINES")"
  if [[ $FOLLOW == 1 ]]; then tail_cmd+=" -F"; fi
  tpu_ssh "$WORKER" "$tail_cmd $REMOTE_ROOT/logs/train.log"
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    # --force also deletes the TPU VM the queued resource holds.
    run gcloud compute tpus queued-resources delete "$NAME" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${LOC[@]}" --quiet
  fi
}
