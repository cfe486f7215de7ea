#!/usr/bin/env bash
# Life cycle of a Compute Engine GPU VM (Deep Learning VM image) for ccmr_jax.
# Run `launch/gpu_vm.sh --help` for the usage text.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/common.sh"

GPU_TYPE="${CCMR_GPU_TYPE:-nvidia-l4}"
GPU_COUNT="${CCMR_GPU_COUNT:-1}"
MACHINE_TYPE="${CCMR_MACHINE_TYPE:-}"
IMAGE_FAMILY="${CCMR_IMAGE_FAMILY:-common-cu128-ubuntu-2204-nvidia-570}"
IMAGE_PROJECT="${CCMR_IMAGE_PROJECT:-deeplearning-platform-release}"
BOOT_DISK_SIZE="${CCMR_BOOT_DISK_SIZE:-200GB}"

usage() {
  cat <<'EOF'
Usage: launch/gpu_vm.sh SUBCOMMAND --name NAME --zone ZONE [options] [-- PROGRAM_ARGS...]

Life cycle of a Compute Engine VM with NVIDIA GPUs (Deep Learning VM image,
driver installed at first boot) running `python -m ccmr_jax.main`:

  create   gcloud compute instances create (GPUs, DLVM image, TERMINATE on
           host maintenance, storage read-write scope for gs:// workdirs)
  setup    copy the code (git archive HEAD, or --repo URL), wait for the NVIDIA
           driver, `pip install -e '.[cuda,data]'` into ~/ccmr_venv
  run      start the program detached with nohup (log: ~/ccmr_run.log), then
           follow the log until the program ends; exits with its status
  logs     follow the log until the program ends
  stop     kill the program
  fetch    copy the workdir to --dest: `gcloud storage cp -r` for gs://,
           `gcloud compute scp` from the VM otherwise
  delete   gcloud compute instances delete (no confirmation prompt)
  all      create, setup, run, fetch, delete (delete skipped with --keep);
           if a step fails the VM is kept and the delete command is printed

Options (environment variable giving the default in brackets):
  --name NAME               VM name (required)                   [CCMR_NAME]
  --zone ZONE               zone, e.g. us-central1-a (required)  [CCMR_ZONE]
  --project PROJECT         GCP project; default: gcloud's configured project
                                                                 [CCMR_PROJECT]
  --gpu-type TYPE           nvidia-l4 (default), nvidia-tesla-t4,
                            nvidia-tesla-v100, nvidia-tesla-a100,
                            nvidia-a100-80gb, nvidia-h100-80gb, ... [CCMR_GPU_TYPE]
  --gpu-count N             GPUs on the VM (default 1)           [CCMR_GPU_COUNT]
  --machine-type TYPE       default from the GPU type and count: g2-standard-*
                            (L4), a2-highgpu-*g (A100), a2-ultragpu-*g (A100
                            80GB), a3-highgpu-*g (H100), n1-standard-8*N (T4,
                            V100, P100, P4)                   [CCMR_MACHINE_TYPE]
  --image-family FAMILY     default common-cu128-ubuntu-2204-nvidia-570
                                                              [CCMR_IMAGE_FAMILY]
  --image-project PROJECT   default deeplearning-platform-release
                                                             [CCMR_IMAGE_PROJECT]
  --boot-disk-size SIZE     default 200GB                   [CCMR_BOOT_DISK_SIZE]
  --spot | --preemptible    create a Spot VM (deleted when preempted) / a
                            preemptible VM
  --repo URL                setup: `git clone URL` on the VM instead of copying
                            `git archive HEAD` of this checkout   [CCMR_REPO]
  --python PY               setup: interpreter for the venv (default python3;
                            installed with apt if missing)       [CCMR_PYTHON]
  --config PATH             program config, relative to the checkout (default
                            configs/flickr.py)                   [CCMR_CONFIG]
  --workdir DIR             program workdir (required by run/fetch/all); gs://...
                            or a path on the VM (relative: to the home directory
                            there)                               [CCMR_WORKDIR]
  --dest DIR                fetch: local destination (default results) [CCMR_DEST]
  --no-follow               run: start the program and return immediately
  --keep                    all: do not delete the VM at the end
  --dry-run                 print the commands (lines starting with "+ ") and
                            run nothing
  -h, --help                show this text
  -- ARGS...                passed to `python -m ccmr_jax.main` unchanged, after
                            --config/--workdir

Example:
  launch/gpu_vm.sh all --name ccmr-l4 --zone us-central1-a --spot \
      --workdir gs://my-bucket/ccmr/l4-run1 -- --config.seed=1
EOF
}

script_opt() {
  case $1 in
    --gpu-type) OPT_VAR=GPU_TYPE OPT_KIND=value ;;
    --gpu-count) OPT_VAR=GPU_COUNT OPT_KIND=value ;;
    --machine-type) OPT_VAR=MACHINE_TYPE OPT_KIND=value ;;
    --image-family) OPT_VAR=IMAGE_FAMILY OPT_KIND=value ;;
    --image-project) OPT_VAR=IMAGE_PROJECT OPT_KIND=value ;;
    --boot-disk-size) OPT_VAR=BOOT_DISK_SIZE OPT_KIND=value ;;
    *) return 1 ;;
  esac
}

# default_machine_type GPU_TYPE COUNT: a machine type that can host the GPUs.
default_machine_type() {
  case $1 in
    nvidia-l4)
      case $2 in
        1) printf '%s' g2-standard-8 ;;
        2) printf '%s' g2-standard-24 ;;
        4) printf '%s' g2-standard-48 ;;
        8) printf '%s' g2-standard-96 ;;
        *) return 1 ;;
      esac
      ;;
    nvidia-tesla-a100)
      case $2 in
        1 | 2 | 4 | 8) printf '%s' "a2-highgpu-${2}g" ;;
        16) printf '%s' a2-megagpu-16g ;;
        *) return 1 ;;
      esac
      ;;
    nvidia-a100-80gb)
      case $2 in 1 | 2 | 4 | 8) printf '%s' "a2-ultragpu-${2}g" ;; *) return 1 ;; esac
      ;;
    nvidia-h100-80gb)
      case $2 in 1 | 2 | 4 | 8) printf '%s' "a3-highgpu-${2}g" ;; *) return 1 ;; esac
      ;;
    nvidia-tesla-t4 | nvidia-tesla-v100 | nvidia-tesla-p100 | nvidia-tesla-p4)
      case $2 in 1 | 2 | 4 | 8) printf '%s' "n1-standard-$((8 * $2))" ;; *) return 1 ;; esac
      ;;
    *) return 1 ;;
  esac
}

resolve_machine_type() {
  case $GPU_COUNT in '' | 0 | *[!0-9]*) die_usage "--gpu-count must be a positive integer, got '$GPU_COUNT'" ;; esac
  if [ -z "$MACHINE_TYPE" ]; then
    MACHINE_TYPE=$(default_machine_type "$GPU_TYPE" "$GPU_COUNT") ||
      die_usage "no default machine type for $GPU_COUNT x $GPU_TYPE; pass --machine-type"
  fi
}

compute() {
  gcloud_run compute "$@"
}

cmd_create() {
  local -a extra=()
  resolve_machine_type
  # A3 (H100) and newer machine types come with their GPUs; the others take
  # an explicit --accelerator (required on N1, accepted on G2/A2).
  case $MACHINE_TYPE in
    a3-* | a4-*) ;;
    *) extra+=("--accelerator=type=$GPU_TYPE,count=$GPU_COUNT") ;;
  esac
  if [ "$SPOT" = 1 ]; then
    extra+=(--provisioning-model=SPOT --instance-termination-action=DELETE)
  fi
  if [ "$PREEMPTIBLE" = 1 ]; then extra+=(--preemptible); fi
  compute instances create "$NAME" "--zone=$ZONE" "--machine-type=$MACHINE_TYPE" \
    ${extra[@]+"${extra[@]}"} \
    "--image-family=$IMAGE_FAMILY" "--image-project=$IMAGE_PROJECT" \
    "--boot-disk-size=$BOOT_DISK_SIZE" --maintenance-policy=TERMINATE \
    --metadata=install-nvidia-driver=True --scopes=default,storage-rw
}

# The DLVM installs the NVIDIA driver during the first boot; wait for it.
wait_for_driver_cmd() {
  # shellcheck disable=SC2016  # expanded by the remote shell
  printf '%s' 'for i in $(seq 1 60); do nvidia-smi -L >/dev/null 2>&1 && break; echo "waiting for the NVIDIA driver ($i/60)"; sleep 10; done; nvidia-smi -L || echo "warning: nvidia-smi does not work yet" >&2'
}

cmd_setup() {
  if [ -z "$REPO_URL" ]; then
    make_tarball
    compute scp "$(local_tarball)" "$NAME:$REMOTE_TARBALL" "--zone=$ZONE"
    run rm -f "$(local_tarball)"
  fi
  compute ssh "$NAME" "--zone=$ZONE" \
    "--command=$(remote_setup_cmd cuda,data "$(wait_for_driver_cmd)")"
}

cmd_run() {
  require WORKDIR --workdir
  compute ssh "$NAME" "--zone=$ZONE" "--command=$(remote_start_cmd 0)"
  if [ "$NO_FOLLOW" = 1 ]; then
    info "started; follow the log with: launch/gpu_vm.sh logs --name $NAME --zone $ZONE"
  else
    cmd_logs
  fi
}

cmd_logs() {
  compute ssh "$NAME" "--zone=$ZONE" "--command=$(remote_follow_cmd)"
}

cmd_stop() {
  compute ssh "$NAME" "--zone=$ZONE" "--command=$(remote_stop_cmd)"
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
    compute scp --recurse "$NAME:$(remote_path "$WORKDIR")" "$DEST" "--zone=$ZONE"
  fi
  fetch_dest_note
}

cmd_delete() {
  compute instances delete "$NAME" "--zone=$ZONE" --quiet
}

ALL_CREATED=0
all_on_exit() {
  local rc=$?
  if [ "$rc" != 0 ] && [ "$ALL_CREATED" = 1 ] && [ "$DRY_RUN" != 1 ]; then
    err ""
    err "The VM '$NAME' was NOT deleted (a step failed) and is billed until it is."
    err "Inspect it, then delete it with:"
    err "  $(shq_cmd "$0" delete --name "$NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"})"
  fi
}

cmd_all() {
  [ "$NO_FOLLOW" = 0 ] || die_usage "--no-follow cannot be used with 'all' (it waits for the run to finish)"
  require WORKDIR --workdir
  resolve_machine_type
  trap all_on_exit EXIT
  cmd_create
  ALL_CREATED=1
  cmd_setup
  cmd_run
  cmd_fetch
  if [ "$KEEP" = 1 ]; then
    info "--keep: the VM '$NAME' is still running; delete it with: $0 delete --name $NAME --zone $ZONE"
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
  check_spot_flags
  case $SUBCOMMAND in
    create) cmd_create ;;
    setup) cmd_setup ;;
    run) cmd_run ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    fetch) cmd_fetch ;;
    delete) cmd_delete ;;
    all) cmd_all ;;
  esac
}

main "$@"
