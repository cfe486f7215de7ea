# shellcheck shell=bash
# shellcheck disable=SC2034  # settings are used by the scripts that source this
# shellcheck disable=SC2088  # ~ in remote commands is for the remote shell
# Shared helpers for launch/tpu.sh and launch/gpu_vm.sh.  Source it, don't run it.
#
# Kept compatible with bash 3.2 (the macOS /bin/bash): no associative arrays,
# no ${x,,}, and empty arrays are expanded as ${a[@]+"${a[@]}"} under `set -u`.
#
# What a script that sources this file must define:
#   usage              print the usage text on stdout
#   script_opt FLAG    set OPT_VAR/OPT_KIND for the script's own flags; return 1
#                      for a flag it does not know

CCMR_LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CCMR_REPO_ROOT="$(cd "$CCMR_LAUNCH_DIR/.." && pwd)"

# Layout on the remote machine(s), relative to the remote user's home.
REMOTE_DIR=ccmr_jax          # the project checkout; the program runs from here
REMOTE_VENV=ccmr_venv        # virtual environment created by `setup`
REMOTE_TARBALL=ccmr_jax.tar.gz
REMOTE_LOG=ccmr_run.log      # stdout+stderr of the program
REMOTE_PID=ccmr_run.pid      # process-group id of the detached run
REMOTE_RC=ccmr_run.rc        # exit status, written when the program ends

# ---------------------------------------------------------------------------
# Settings shared by both scripts.  Environment variables give the defaults,
# so a session can `export CCMR_NAME=... CCMR_ZONE=...` once.
SUBCOMMAND=""
EXTRA_ARGS=()
DRY_RUN=0
NAME="${CCMR_NAME:-}"
ZONE="${CCMR_ZONE:-}"
PROJECT="${CCMR_PROJECT:-}"
CONFIG="${CCMR_CONFIG:-configs/flickr.py}"
WORKDIR="${CCMR_WORKDIR:-}"
REPO_URL="${CCMR_REPO:-}"
DEST="${CCMR_DEST:-results}"
REMOTE_PYTHON="${CCMR_PYTHON:-python3}"
SPOT=0
PREEMPTIBLE=0
NO_FOLLOW=0
KEEP=0

# ---------------------------------------------------------------------------
# Messages.  Everything except the `+ command` lines goes to stderr, so the
# stdout of --dry-run is exactly the list of commands.
err() { printf '%s\n' "$*" >&2; }
info() { printf '[%s] %s\n' "${0##*/}" "$*" >&2; }
die() { err "error: $*"; exit 1; }
die_usage() {
  err "error: $*"
  err ""
  usage >&2
  exit 2
}

# ---------------------------------------------------------------------------
# Quoting.  shq WORD prints WORD quoted for a POSIX shell (bare if it is made of
# safe characters only); shq_cmd WORD... prints the words quoted and joined.
shq() {
  local s=$1 out
  case $s in
    '' | *[!A-Za-z0-9_@%+=:,./-]*) ;;
    *) printf '%s' "$s"; return 0 ;;
  esac
  out="'"
  while [[ $s == *"'"* ]]; do
    out+="${s%%"'"*}'\\''"
    s=${s#*"'"}
  done
  printf '%s' "$out$s'"
}

shq_cmd() {
  local sep="" a
  for a in "$@"; do
    printf '%s' "$sep"
    shq "$a"
    sep=" "
  done
}

# run CMD...: print "+ CMD" (quoted, one line, copy-pasteable) on stdout, then
# run it, unless --dry-run was given.
run() {
  printf '+ %s\n' "$(shq_cmd "$@")"
  if [ "$DRY_RUN" = 1 ]; then
    return 0
  fi
  "$@"
}

# gcloud_run ARGS...: `run gcloud ARGS...`, adding --project when one was given
# (otherwise gcloud's configured default project is used).
gcloud_run() {
  run gcloud "$@" ${PROJECT:+"--project=$PROJECT"}
}

# gcloud_capture VAR ARGS...: like gcloud_run but stores the command's stdout
# in VAR.  Under --dry-run the command is printed and VAR is left unchanged.
gcloud_capture() {
  local __var=$1 __out
  shift
  set -- gcloud "$@" ${PROJECT:+"--project=$PROJECT"}
  printf '+ %s\n' "$(shq_cmd "$@")"
  if [ "$DRY_RUN" = 1 ]; then
    return 0
  fi
  __out=$("$@")
  printf -v "$__var" '%s' "$__out"
}

# ---------------------------------------------------------------------------
# Argument parsing.  Flags accept `--flag value` and `--flag=value`; the first
# word that is not a flag is the subcommand; everything after `--` goes to the
# program unchanged (EXTRA_ARGS).

# common_opt FLAG: set OPT_VAR (variable to assign) and OPT_KIND (value|bool).
common_opt() {
  case $1 in
    --name) OPT_VAR=NAME OPT_KIND=value ;;
    --zone) OPT_VAR=ZONE OPT_KIND=value ;;
    --project) OPT_VAR=PROJECT OPT_KIND=value ;;
    --config) OPT_VAR=CONFIG OPT_KIND=value ;;
    --workdir) OPT_VAR=WORKDIR OPT_KIND=value ;;
    --repo) OPT_VAR=REPO_URL OPT_KIND=value ;;
    --dest) OPT_VAR=DEST OPT_KIND=value ;;
    --python) OPT_VAR=REMOTE_PYTHON OPT_KIND=value ;;
    --dry-run) OPT_VAR=DRY_RUN OPT_KIND=bool ;;
    --spot) OPT_VAR=SPOT OPT_KIND=bool ;;
    --preemptible) OPT_VAR=PREEMPTIBLE OPT_KIND=bool ;;
    --no-follow) OPT_VAR=NO_FOLLOW OPT_KIND=bool ;;
    --keep) OPT_VAR=KEEP OPT_KIND=bool ;;
    *) return 1 ;;
  esac
}

# set_opt FLAG VALUE HAS_VALUE
set_opt() {
  script_opt "$1" || common_opt "$1" || die_usage "unknown option: $1"
  if [ "$OPT_KIND" = bool ]; then
    [ "$3" = 0 ] || die_usage "$1 takes no value"
    printf -v "$OPT_VAR" '%s' 1
  else
    [ -n "$2" ] || die_usage "$1 needs a non-empty value"
    printf -v "$OPT_VAR" '%s' "$2"
  fi
  # Remember which settings were given explicitly (GIVEN_<VAR>=1).
  printf -v "GIVEN_$OPT_VAR" '%s' 1
}

parse_args() {
  local arg
  while [ $# -gt 0 ]; do
    arg=$1
    case $arg in
      -h | --help)
        usage
        exit 0
        ;;
      --)
        shift
        EXTRA_ARGS=("$@")
        return 0
        ;;
      --*=*)
        set_opt "${arg%%=*}" "${arg#*=}" 1
        ;;
      --*)
        if { script_opt "$arg" || common_opt "$arg"; } && [ "$OPT_KIND" = value ]; then
          [ $# -ge 2 ] || die_usage "$arg needs a value"
          set_opt "$arg" "$2" 1
          shift
        else
          set_opt "$arg" "" 0
        fi
        ;;
      -*)
        die_usage "unknown option: $arg"
        ;;
      *)
        if [ -z "$SUBCOMMAND" ]; then
          SUBCOMMAND=$arg
        else
          die_usage "unexpected argument: $arg (arguments for the program go after --)"
        fi
        ;;
    esac
    shift
  done
}

# require VAR FLAG: exit 2 with the usage text if the setting is empty.
require() {
  local value
  eval "value=\${$1:-}"
  [ -n "$value" ] || die_usage "missing required flag $2 (needed by '$SUBCOMMAND')"
}

check_spot_flags() {
  if [ "$SPOT" = 1 ] && [ "$PREEMPTIBLE" = 1 ]; then
    die_usage "--spot and --preemptible are mutually exclusive"
  fi
}

is_gcs() {
  case $1 in gs://*) return 0 ;; *) return 1 ;; esac
}

# A local (non-gs://) workdir lives on the remote machine.  A relative path is
# relative to the remote home directory -- not to the checkout ~/$REMOTE_DIR,
# which `setup` replaces -- and so is a path starting with ~/.
remote_rel_workdir() {
  case $WORKDIR in
    '~/'*) printf '%s' "${WORKDIR#\~/}" ;;
    *) printf '%s' "$WORKDIR" ;;
  esac
}

# remote_path: the workdir as scp sees it on the remote side.
remote_path() {
  remote_rel_workdir
}

# remote_workdir_word: the --workdir argument as remote shell text.
remote_workdir_word() {
  case $WORKDIR in
    gs://* | /*) shq "--workdir=$WORKDIR" ;;
    *) printf '%s' "--workdir=\"\$HOME\"/$(shq "$(remote_rel_workdir)")" ;;
  esac
}

# ---------------------------------------------------------------------------
# The code to install: a `git archive HEAD` tarball of this checkout, unless
# --repo URL is given (then every machine clones the repository itself).
local_tarball() {
  printf '%s' "${TMPDIR:-/tmp}/ccmr_jax-$NAME.tar.gz"
}

make_tarball() {
  if [ "$DRY_RUN" != 1 ]; then
    git -C "$CCMR_REPO_ROOT" rev-parse --verify -q HEAD >/dev/null ||
      die "$CCMR_REPO_ROOT is not a git checkout with a commit; use --repo URL"
    if [ -n "$(git -C "$CCMR_REPO_ROOT" status --porcelain --untracked-files=no)" ]; then
      info "warning: uncommitted changes are NOT copied (the tarball is made from HEAD by git archive)"
    fi
  fi
  run git -C "$CCMR_REPO_ROOT" archive --format=tar.gz "--output=$(local_tarball)" HEAD
}

# ---------------------------------------------------------------------------
# Remote commands.  Each prints one line of shell for the remote login shell
# (bash); `gcloud ... ssh --command=LINE` hands it over as a single argument.

# remote_unpack_cmd: replace ~/$REMOTE_DIR with the uploaded tarball or a clone.
remote_unpack_cmd() {
  if [ -n "$REPO_URL" ]; then
    printf '%s' "rm -rf ~/$REMOTE_DIR && git clone --depth=1 $(shq "$REPO_URL") ~/$REMOTE_DIR"
  else
    printf '%s' "rm -rf ~/$REMOTE_DIR && mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$REMOTE_TARBALL -C ~/$REMOTE_DIR && rm -f ~/$REMOTE_TARBALL"
  fi
}

# remote_setup_cmd EXTRA [PRELUDE]: unpack the code, create ~/$REMOTE_VENV with
# --python (installing it with apt if missing), `pip install -e '.[EXTRA]'`.
remote_setup_cmd() {
  local extra=$1 prelude=${2:-} py venv
  py=$(shq "$REMOTE_PYTHON")
  venv="~/$REMOTE_VENV"
  printf '%s' "set -e; "
  remote_alive_fn
  printf '%s' "if [ -f ~/$REMOTE_PID ] && alive \"\$(cat ~/$REMOTE_PID)\"; then echo \"ccmr_jax is running on \$(hostname); stop it before setup\" >&2; exit 1; fi; "
  printf '%s' "${prelude:+$prelude; }$(remote_unpack_cmd); "
  printf '%s' "apt_get() { sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq \"\$@\"; }; "
  printf '%s' "if ! command -v $py >/dev/null 2>&1; then apt_get update && apt_get install -y $py $py-venv; fi; "
  printf '%s' "if [ ! -x $venv/bin/pip ]; then $py -m venv $venv || { apt_get update && apt_get install -y $py-venv && $py -m venv --clear $venv; }; fi; "
  printf '%s' "$venv/bin/python -m pip install -q --upgrade pip; "
  printf '%s' "cd ~/$REMOTE_DIR && $venv/bin/python -m pip install -e \".[$extra]\"; "
  printf '%s' "$venv/bin/python -c \"import ccmr_jax, jax; print(ccmr_jax.__name__, ccmr_jax.__version__, jax.__name__, jax.__version__)\""
}

# dq WORD: WORD in double quotes (for text that a second shell parses again).
dq() {
  printf '"%s"' "$(printf '%s' "$1" | sed 's/[\\"$`]/\\&/g')"
}

# remote_alive_fn: shell function `alive PID` for the remote side (a zombie
# waiting to be reaped counts as ended).
remote_alive_fn() {
  # shellcheck disable=SC2016  # expanded by the remote shell
  printf '%s' 'alive() { kill -0 "$1" 2>/dev/null || return 1; case "$(ps -o stat= -p "$1" 2>/dev/null)" in *Z*) return 1 ;; esac; }; '
}

# remote_start_cmd MULTIHOST: start `python -m ccmr_jax.main --config=...
# --workdir=... [--config.multihost=True] EXTRA_ARGS...` detached (nohup +
# setsid: it survives the ssh session and gets its own process group); output
# to ~/$REMOTE_LOG, exit status to ~/$REMOTE_RC.
remote_start_cmd() {
  local args inner
  args="$(shq "--config=$CONFIG") $(remote_workdir_word)"
  if [ "$1" = 1 ]; then
    args+=" --config.multihost=True"
  fi
  if [ ${#EXTRA_ARGS[@]} -gt 0 ]; then
    args+=" $(shq_cmd "${EXTRA_ARGS[@]}")"
  fi
  # shellcheck disable=SC2016  # $? is for the remote shell
  inner="cd ~/$REMOTE_DIR && export PYTHONUNBUFFERED=1 && ~/$REMOTE_VENV/bin/python -m ccmr_jax.main $args ; echo "'$?'" > ~/$REMOTE_RC"
  printf '%s' "if [ ! -x ~/$REMOTE_VENV/bin/python ]; then echo \"ccmr_jax is not installed on \$(hostname): run the setup step first\" >&2; exit 1; fi; "
  remote_alive_fn
  printf '%s' "if [ -f ~/$REMOTE_PID ] && alive \"\$(cat ~/$REMOTE_PID)\"; then echo \"ccmr_jax is already running on \$(hostname) (pid \$(cat ~/$REMOTE_PID)); use the stop step first\" >&2; exit 1; fi; "
  printf '%s' "rm -f ~/$REMOTE_RC; nohup setsid bash -c $(dq "$inner") > ~/$REMOTE_LOG 2>&1 < /dev/null & echo \$! > ~/$REMOTE_PID; "
  printf '%s' "echo \"started on \$(hostname): pid \$(cat ~/$REMOTE_PID), log ~/$REMOTE_LOG\""
}

# remote_follow_cmd: print the log until the run ends; exit with its status.
remote_follow_cmd() {
  printf '%s' "if [ ! -f ~/$REMOTE_PID ]; then echo \"no ccmr_jax run was started on \$(hostname)\" >&2; exit 1; fi; "
  remote_alive_fn
  printf '%s' "pid=\$(cat ~/$REMOTE_PID); if alive \"\$pid\"; then tail -n +1 -F --pid=\"\$pid\" ~/$REMOTE_LOG; else cat ~/$REMOTE_LOG; fi; "
  printf '%s' "rc=\$(cat ~/$REMOTE_RC 2>/dev/null || echo 1); echo \"ccmr_jax finished on \$(hostname) with exit status \$rc\" >&2; exit \"\$rc\""
}

# remote_stop_cmd: terminate the run's whole process group.
remote_stop_cmd() {
  remote_alive_fn
  printf '%s' "if [ -f ~/$REMOTE_PID ] && alive \"\$(cat ~/$REMOTE_PID)\"; then kill -TERM -- \"-\$(cat ~/$REMOTE_PID)\" && echo \"stopped ccmr_jax on \$(hostname)\"; else echo \"ccmr_jax is not running on \$(hostname)\"; fi"
}

fetch_dest_note() {
  info "results are in $DEST/$(basename "$WORKDIR")"
}
