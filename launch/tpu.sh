#!/usr/bin/env bash
# Life cycle of a Cloud TPU VM (single host or pod slice) for ccmr_jax.
# Run `launch/tpu.sh --help` for the usage text.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

ACCELERATOR_TYPE="${CCMR_ACCELERATOR_TYPE:-v4-8}"
TPU_VERSION="${CCMR_TPU_VERSION:-}"
WORKER=0

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh SUBCOMMAND --name NAME --zone ZONE [options] [-- PROGRAM_ARGS...]

Life cycle of a Cloud TPU VM (one host or a multi-host pod slice) running
`python -m ccmr_jax.main`.  Every step is a separate subcommand:

  create   gcloud compute tpus tpu-vm create
  setup    copy the code to every worker (git archive HEAD, or --repo URL) and
           `pip install -e '.[tpu,data]'` into ~/ccmr_venv on every worker
  run      start the program on all workers (--worker=all), detached with nohup
           (log: ~/ccmr_run.log on each worker), then follow worker 0's log
           until the program ends; exits with the program's status
  logs     follow the log of --worker N (default 0) until the program ends
  stop     kill the program on all workers
  fetch    copy the workdir to --dest: `gcloud storage cp -r` for gs://,
           scp from worker 0 otherwise
  delete   gcloud compute tpus tpu-vm delete (no confirmation prompt)
  all      create, setup, run, fetch, delete (delete skipped with --keep);
           if a step fails the TPU is kept and the delete command is printed

Options (environment variable giving the default in brackets):
  --name NAME               TPU name (required)                  [CCMR_NAME]
  --zone ZONE               zone, e.g. us-central2-b (required)  [CCMR_ZONE]
  --project PROJECT         GCP project; default: gcloud's configured project
                                                                 [CCMR_PROJECT]
  --accelerator-type TYPE   v4-8, v4-32, v5litepod-8, v5p-16, v6e-8, ... (default
                            v4-8).  Types above -8 are multi-host slices.
                                                         [CCMR_ACCELERATOR_TYPE]
  --version, --runtime-version VERSION
                            TPU software version; default by TPU generation:
                            tpu-ubuntu2204-base (v4 and older),
                            v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv5 (v5p),
                            v2-alpha-tpuv6e (v6e)                [CCMR_TPU_VERSION]
  --spot | --preemptible    create a Spot / preemptible TPU
  --repo URL                setup: `git clone URL` on every worker instead of
                            copying `git archive HEAD` of this checkout [CCMR_REPO]
  --python PY               setup: interpreter for the venv (default python3;
                            installed with apt if missing)       [CCMR_PYTHON]
  --config PATH             program config, relative to the checkout (default
                            configs/flickr.py)                   [CCMR_CONFIG]
  --workdir DIR             program workdir (required by run/fetch/all).  Must be
                            gs://... on a multi-host slice: every worker must see
                            the same workdir.  A local path is on the TPU VM;
                            relative: to the home directory there. [CCMR_WORKDIR]
  --dest DIR                fetch: local destination (default results) [CCMR_DEST]
  --worker N|all            logs: which worker's log to follow (default 0)
  --no-follow               run: start the program and return immediately
  --keep                    all: do not delete the TPU at the end
  --dry-run                 print the commands (lines starting with "+ ") and
                            run nothing
  -h, --help                show this text
  -- ARGS...                passed to `python -m ccmr_jax.main` unchanged, after
                            --config/--workdir (and --config.multihost=True,
                            added on multi-host slices)

Examples:
  launch/tpu.sh all --name ccmr-v4 --zone us-central2-b --accelerator-type v4-8 \
      --workdir gs://my-bucket/ccmr/run1 -- --config.seed=1
  launch/tpu.sh run --name ccmr-pod --zone us-central2-b --accelerator-type v4-32 \
      --workdir gs://my-bucket/ccmr/pod1 --dry-run
EOF
}

script_opt() {
  case $1 in
    --accelerator-type) OPT_VAR=ACCELERATOR_TYPE OPT_KIND=value ;;
    --version | --runtime-version) OPT_VAR=TPU_VERSION OPT_KIND=value ;;
    --worker) OPT_VAR=WORKER OPT_KIND=value ;;
    *) return 1 ;;
  esac
}

# accel_size TYPE: the number at the end of an accelerator type (v4-32 -> 32).
accel_size() {
  local n=${1##*-}
  case $1 in *-*) ;; *) return 1 ;; esac
  case $n in '' | *[!0-9]*) return 1 ;; esac
  printf '%s' "$n"
}

# Every TPU generation has at most 8 cores/chips per host in its accelerator
# type's number (v2-8, v3-8, v4-8, v5p-8, v5litepod-8, v6e-8 are one host), so
# anything above 8 is a multi-host slice.
is_multihost() {
  local n
  n=$(accel_size "$1") || return 1
  [ "$n" -gt 8 ]
}

default_tpu_version() {
  case $1 in
    v6e-*) printf '%s' v2-alpha-tpuv6e ;;
    v5p-*) printf '%s' v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) printf '%s' v2-alpha-tpuv5-lite ;;
    *) printf '%s' tpu-ubuntu2204-base ;;
  esac
}

check_accel() {
  accel_size "$ACCELERATOR_TYPE" >/dev/null ||
    die_usage "--accelerator-type '$ACCELERATOR_TYPE' does not look like v4-8, v5litepod-16, v6e-8, ..."
}

# A local workdir is different on every host of a pod slice; refuse it.
check_workdir() {
  require WORKDIR --workdir
  if is_multihost "$ACCELERATOR_TYPE" && ! is_gcs "$WORKDIR"; then
    die_usage "--workdir must be a gs:// path on the multi-host slice $ACCELERATOR_TYPE (got '$WORKDIR'): every worker runs the program and all of them must see the same workdir; a local path would be a different directory on each host"
  fi
}

tpu() {
  gcloud_run compute tpus tpu-vm "$@"
}

cmd_create() {
  local version=${TPU_VERSION:-$(default_tpu_version "$ACCELERATOR_TYPE")}
  local -a extra=()
  if [ "$SPOT" = 1 ]; then extra+=(--spot); fi
  if [ "$PREEMPTIBLE" = 1 ]; then extra+=(--preemptible); fi
  tpu create "$NAME" "--zone=$ZONE" "--accelerator-type=$ACCELERATOR_TYPE" \
    "--version=$version" ${extra[@]+"${extra[@]}"}
}

cmd_setup() {
  if [ -z "$REPO_URL" ]; then
    make_tarball
    tpu scp "$(local_tarball)" "$NAME:$REMOTE_TARBALL" "--zone=$ZONE" --worker=all
    run rm -f "$(local_tarball)"
  fi
  tpu ssh "$NAME" "--zone=$ZONE" --worker=all "--command=$(remote_setup_cmd tpu,data)"
}

# The accelerator type decides multi-host handling; make sure it is the one of
# the existing TPU (under --dry-run the flag value is trusted).
sync_accel_with_tpu() {
  local actual=""
  gcloud_capture actual compute tpus tpu-vm describe "$NAME" "--zone=$ZONE" \
    '--format=value(acceleratorType)'
  if [ -n "$actual" ] && [ "$actual" != "$ACCELERATOR_TYPE" ]; then
    if [ "${GIVEN_ACCELERATOR_TYPE:-0}" = 1 ] || [ -n "${CCMR_ACCELERATOR_TYPE:-}" ]; then
      die "TPU $NAME is a $actual, not a $ACCELERATOR_TYPE (--accelerator-type)"
    fi
    info "TPU $NAME is a $actual"
    ACCELERATOR_TYPE=$actual
  fi
}

cmd_run() {
  local multihost=0
  check_workdir
  if is_multihost "$ACCELERATOR_TYPE"; then multihost=1; fi
  tpu ssh "$NAME" "--zone=$ZONE" --worker=all "--command=$(remote_start_cmd "$multihost")"
  if [ "$NO_FOLLOW" = 1 ]; then
    info "started; follow the log with: launch/tpu.sh logs --name $NAME --zone $ZONE"
  else
    cmd_logs
  fi
}

cmd_logs() {
  case $WORKER in all) ;; '' | *[!0-9]*) die_usage "--worker must be a worker number or all, got '$WORKER'" ;; esac
  tpu ssh "$NAME" "--zone=$ZONE" "--worker=$WORKER" "--command=$(remote_follow_cmd)"
}

cmd_stop() {
  tpu ssh "$NAME" "--zone=$ZONE" --worker=all "--command=$(remote_stop_cmd)"
}

cmd_fetch() {
  require WORKDIR --workdir
  if ! is_gcs "$WORKDIR"; then
    require NAME --name
    require ZONE --zone
  fi
  run mkdir -p "$DEST"
  if is_gcs "$WORKDIR"; then
    gcloud_run storage cp -r "$WORKDIR" "$DEST"
  else
    tpu scp --recurse "$NAME:$(remote_path "$WORKDIR")" "$DEST" "--zone=$ZONE" --worker=0
  fi
  fetch_dest_note
}

cmd_delete() {
  tpu delete "$NAME" "--zone=$ZONE" --quiet
}

ALL_CREATED=0
all_on_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && [ "$ALL_CREATED" = 1 ] && [ "$DRY_RUN" != 1 ]; then
    err ""
    err "The TPU '$NAME' was NOT deleted (a step failed) and is billed until it is."
    err "Inspect it, then delete it with:"
    err "  $(shq_cmd "$0" delete --name "$NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"})"
  fi
}

cmd_all() {
  [ "$NO_FOLLOW" = 0 ] || die_usage "--no-follow cannot be used with 'all' (it waits for the run to finish)"
  check_workdir
  trap all_on_exit EXIT
  cmd_create
  ALL_CREATED=1
  cmd_setup
  cmd_run
  cmd_fetch
  if [ "$KEEP" = 1 ]; then
    info "--keep: the TPU '$NAME' is still running; delete it with: $0 delete --name $NAME --zone $ZONE"
  else
    cmd_delete
  fi
}

main() {
  parse_args "$@"
  [ -n "$SUBCOMMAND" ] || die_usage "missing subcommand (create|setup|run|logs|stop|fetch|delete|all)"
  case $SUBCOMMAND in
    create | setup | run | logs | stop | delete | all)
      require NAME --name
      require ZONE --zone
      ;;
    fetch) ;;
    *) die_usage "unknown subcommand: $SUBCOMMAND" ;;
  esac
  check_accel
  check_spot_flags
  case $SUBCOMMAND in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run)
      check_workdir
      sync_accel_with_tpu
      cmd_run
      ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    fetch) cmd_fetch ;;
    delete) cmd_delete ;;
    all) cmd_all ;;
  esac
}

main "$@"
