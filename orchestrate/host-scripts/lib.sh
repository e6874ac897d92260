# shellcheck shell=sh
# The functions every host script of shardmove is made of. Each script sent to a shard host
# is this file followed by one entry file (see orchestrate/src/scripts.rs), run as
# `sh -c SCRIPT NAME ARGS...`, so values only ever arrive as positional arguments.
#
# These run inside read-only windows, where every process costs milliseconds on a busy host:
# shell builtins (read, printf, [) wherever an external command is not needed.

# The exit codes shardmove reads, one table for every script (orchestrate::scripts::exit
# holds the same values; a unit test compares them). A git command's own status never
# passes through: git fsck's status is a bitmask that covers this range too, so each git
# failure maps to a code of ours, with git's message on stderr.
# shellcheck disable=SC2034
EX_ORIG_EXISTS=80      # pre-receive.shardmove-orig exists and is not ours to overwrite
# shellcheck disable=SC2034
EX_PUSHES_IN_FLIGHT=81 # pushes (or fetches) still working after the wait; stdout says which
# shellcheck disable=SC2034
EX_MISSING=82          # the repository or tree to check is not there
# shellcheck disable=SC2034
EX_GIT=83              # a git command failed
# shellcheck disable=SC2034
EX_OBJECTS_MISSING=84  # objects the refs need are missing
# shellcheck disable=SC2034
EX_EXISTS=85           # the path to create already exists
# shellcheck disable=SC2034
EX_FAILPOINT=86        # a test failpoint fired here
# shellcheck disable=SC2034
EX_CORRUPT=87          # git fsck found the repository broken
# shellcheck disable=SC2034
EX_UNSUPPORTED=88      # git on this host cannot read the repository's format
# shellcheck disable=SC2034

# git, trusting the repository whoever owns it: the forge's daemon user owns the copies, and
# git refuses such a repository to anyone else, root included ("dubious ownership"). Every
# git command here only reads a repository, or creates one of its own (init).
git() { command git -c safe.directory='*' "$@"; }

# The line that marks our pre-receive hook (orchestrate::maintenance::HOOK_MARKER).
HOOK_MARKER=shardmove-maintenance-hook

# failpoint NAME: in tests (SHARDMOVE_FAILPOINTS names it), stop here the way a crash would,
# with part of the work done (see orchestrate::failpoint).
failpoint() {
  case ",${SHARDMOVE_FAILPOINTS-}," in *",$1,"*) exit "$EX_FAILPOINT" ;; esac
}

# is_ours FILE: whether FILE is our maintenance hook (the marker sits in its first lines).
is_ours() {
  [ -f "$1" ] || return 1
  n=0
  while [ $n -lt 3 ] && IFS= read -r line; do
    case $line in *"$HOOK_MARKER"*) return 0 ;; esac
    n=$((n + 1))
  done < "$1"
  return 1
}

# same_file A B: whether A and B are one file (hard links; symlinks not followed).
same_file() {
  { [ -e "$2" ] || [ -L "$2" ]; } &&
    [ "$(stat -c %d:%i -- "$1")" = "$(stat -c %d:%i -- "$2")" ]
}

# hooks_dir REPO: where git looks for REPO's hooks (core.hooksPath honoured).
hooks_dir() {
  git -C "$1" rev-parse --path-format=absolute --git-path hooks || exit "$EX_GIT"
}

# install_hook REPO MESSAGE: our pre-receive hook refuses every push with MESSAGE. An existing
# hook is hard-linked to pre-receive.shardmove-orig before ours is renamed over it: there is
# no instant without a hook, and remove_hook restores the very same file. Installing again
# only changes the message.
install_hook() {
  hooks=$(hooks_dir "$1")
  [ -d "$hooks" ] || mkdir -p "$hooks"
  printf '%s\n' "$2" > "$hooks/shardmove-maintenance.msg.tmp"
  mv -f "$hooks/shardmove-maintenance.msg.tmp" "$hooks/shardmove-maintenance.msg"
  if ! is_ours "$hooks/pre-receive"; then
    if [ -e "$hooks/pre-receive" ] || [ -L "$hooks/pre-receive" ]; then
      if same_file "$hooks/pre-receive" "$hooks/pre-receive.shardmove-orig"; then
        : # linked by an install that died before its rename: go on from there
      elif [ -e "$hooks/pre-receive.shardmove-orig" ] || [ -L "$hooks/pre-receive.shardmove-orig" ]; then
        echo "$hooks/pre-receive.shardmove-orig already exists; not overwriting it" >&2
        exit "$EX_ORIG_EXISTS"
      else
        ln -P "$hooks/pre-receive" "$hooks/pre-receive.shardmove-orig"
        failpoint hook-install-linked
      fi
    fi
    # The hook's own lines are literal text: their $ must not expand here.
    # shellcheck disable=SC2016
    printf '%s\n' '#!/bin/sh' \
      "# $HOOK_MARKER: installed by \`shardmove repo maintenance --start\`, removed by" \
      '# `--stop` (which restores any original hook from pre-receive.shardmove-orig).' \
      "# Refuses every push with the operator's message; clone and fetch are not affected." \
      'msg="$(dirname "$0")/shardmove-maintenance.msg"' \
      'if [ -r "$msg" ]; then cat "$msg" >&2; else echo "repository in maintenance" >&2; fi' \
      'exit 1' > "$hooks/pre-receive.shardmove-tmp"
    chmod 755 "$hooks/pre-receive.shardmove-tmp"
    mv -f "$hooks/pre-receive.shardmove-tmp" "$hooks/pre-receive"
  fi
}

# remove_hook REPO: our hook gone, any original pre-receive back (a no-op without ours).
remove_hook() {
  hooks=$(hooks_dir "$1")
  if [ -e "$hooks/pre-receive.shardmove-orig" ] || [ -L "$hooks/pre-receive.shardmove-orig" ]; then
    mv -f "$hooks/pre-receive.shardmove-orig" "$hooks/pre-receive"
    failpoint hook-remove-restored
    rm -f "$hooks/shardmove-maintenance.msg"
  elif is_ours "$hooks/pre-receive"; then
    rm -f "$hooks/pre-receive"
    failpoint hook-remove-removed
    rm -f "$hooks/shardmove-maintenance.msg"
  else
    rm -f "$hooks/shardmove-maintenance.msg"
  fi
}

# wait_idle REPO SECONDS: returns once no process working in REPO runs receive-pack (or an
# observation fetch) and no ref lock is held; after SECONDS, prints what is still busy and
# exits EX_PUSHES_IN_FLIGHT. git receive-pack always chdirs into the repository, and git holds
# a ref's lock for the whole ref update, so "no such process and no lock" means no ref can
# change any more.
wait_idle() {
  repo=$(cd "$1" && pwd -P) || exit "$EX_MISSING"
  pat=$(cwd_pattern "$repo")
  end=
  while what=$(busy "$repo" "$pat"); do
    now=$(date +%s)
    [ -n "$end" ] || end=$((now + $2))
    if [ "$now" -ge "$end" ]; then echo "$what"; exit "$EX_PUSHES_IN_FLIGHT"; fi
    sleep 0.1
  done
}

# cwd_pattern DIR: DIR as a `find -lname` pattern matching exactly DIR.
cwd_pattern() {
  case $1 in
    *[][*?\\]*) printf '%s' "$1" | sed 's/[][*?\\]/\\&/g' ;;
    *) printf '%s' "$1" ;;
  esac
}

# procs_in PATTERN: "PID COMMAND LINE" of each process whose working directory matches
# PATTERN (git chdirs into the repository it works on, whoever started it and how).
procs_in() {
  find /proc -mindepth 2 -maxdepth 2 -name cwd -lname "$1" 2>/dev/null | while IFS= read -r link; do
    dir=${link%/cwd}
    cmd=$(tr '\0' ' ' < "$dir/cmdline" 2>/dev/null) || continue
    printf '%s %s\n' "${dir#/proc/}" "$cmd"
  done
}

# busy REPO PATTERN: prints the first thing still working in REPO, or fails when idle.
busy() {
  if procs_in "$2" | {
    while read -r pid cmd; do
      case "$cmd" in
        *receive-pack*|*" fetch "*) echo "process $pid: $cmd"; exit 0 ;;
      esac
    done
    exit 1
  }; then
    return 0
  fi
  if [ -e "$1/packed-refs.lock" ]; then echo "lock file $1/packed-refs.lock"; return 0; fi
  lock=$(find "$1/refs" -name '*.lock' -print -quit 2>/dev/null)
  if [ -n "$lock" ]; then echo "lock file $lock"; return 0; fi
  # reftable: a ref update holds tables.list.lock from its first write to its commit.
  if [ -d "$1/reftable" ]; then
    lock=$(find "$1/reftable" -maxdepth 1 -name '*.lock' -print -quit 2>/dev/null)
    if [ -n "$lock" ]; then echo "lock file $lock"; return 0; fi
  fi
  return 1
}

# git_supports OBJECTS REFS: whether git here can create (and so read) a repository of that
# object format and ref storage; if not, says which git this is and exits EX_UNSUPPORTED.
git_supports() {
  [ "$1" = sha1 ] && [ "$2" = files ] && return 0
  probe=$(mktemp -d) || exit "$EX_GIT"
  set -- "$1" "$2" "--object-format=$1"
  [ "$2" = files ] || set -- "$@" "--ref-format=$2"
  if err=$(git init --bare --quiet "$3" ${4:+"$4"} "$probe/probe.git" 2>&1); then
    rm -rf "$probe"
    return 0
  fi
  rm -rf "$probe"
  echo "$(git --version) on $(uname -n) cannot use $1 objects with $2 refs: $err" | head -n 1 >&2
  exit "$EX_UNSUPPORTED"
}

# discard_copy DEST STAMP STAGING: a rolled-back copy moved aside as DEST.rolled-back-STAMP,
# and the transfer's staging directory removed (left alone while a transfer holds its lock).
discard_copy() {
  if [ -e "$1" ]; then
    mv "$1" "$1.rolled-back-$2"
    failpoint discard-moved-aside
  fi
  if [ -d "$3" ]; then flock -n "$3/lock" rm -rf "$3" || true; fi
}

# fsck_connectivity REPO: git's full connectivity check, then the refs' object ids.
fsck_connectivity() {
  [ -d "$1" ] || exit "$EX_MISSING"
  git -C "$1" fsck --connectivity-only --no-progress >&2 || exit "$EX_CORRUPT"
  git -C "$1" for-each-ref --format='%(objectname)' || exit "$EX_GIT"
}

# refs_and_connected_since REPO walk|refs-only: prints REPO's refs, then (walk) walks every
# object reachable from the TIP lines on stdin but not from the ^TIP ones (git's push-time
# connectivity check); refs-only: no ref points anywhere new, nothing to walk.
refs_and_connected_since() {
  git -C "$1" for-each-ref --format='%(objectname) %(refname)' || exit "$EX_GIT"
  [ "$2" = refs-only ] && return 0
  git -C "$1" rev-list --objects --quiet --stdin || exit "$EX_OBJECTS_MISSING"
}

# create_bare REPO: a new bare repository at REPO (refused if anything is there).
create_bare() {
  if [ -e "$1" ]; then echo "$1 already exists" >&2; exit "$EX_EXISTS"; fi
  mkdir -p "$(dirname "$1")"
  git init --bare --quiet "$1" || exit "$EX_GIT"
}

# doctor_scan ROOT REL...: what shardmove doctor compares with the registry, one tab-separated
# line per finding (values never contain a tab or a newline: paths come from the registry,
# messages are cut at their first line):
#   repo REL present|missing ours|own|none MESSAGE   for each REL under ROOT
#   staging NAME locked|free MTIME                   for each transfer staging directory
#   aside PATH MTIME                                 for each *.replaced-* / *.rolled-back-*
doctor_scan() {
  root=$1
  shift
  tab=$(printf '\t')
  for rel in "$@"; do
    repo="$root/$rel"
    if [ ! -d "$repo" ]; then
      printf 'repo\t%s\tmissing\tnone\t\n' "$rel"
      continue
    fi
    hooks=$(git -C "$repo" rev-parse --path-format=absolute --git-path hooks 2>/dev/null) || hooks="$repo/hooks"
    hook=none
    if is_ours "$hooks/pre-receive"; then
      hook=ours
    elif [ -e "$hooks/pre-receive" ]; then
      hook=own
    fi
    msg=
    if [ -r "$hooks/shardmove-maintenance.msg" ]; then
      IFS= read -r msg < "$hooks/shardmove-maintenance.msg" || true
    fi
    case $msg in *"$tab"*) msg=$(printf '%s' "$msg" | tr '\t' ' ') ;; esac
    printf 'repo\t%s\tpresent\t%s\t%s\n' "$rel" "$hook" "$msg"
  done
  if [ -d "$root/.shardrecv" ]; then
    for dir in "$root"/.shardrecv/*; do
      [ -d "$dir" ] || continue
      if flock -n "$dir/lock" true 2>/dev/null; then lock=free; else lock=locked; fi
      printf 'staging\t%s\t%s\t%s\n' "${dir##*/}" "$lock" "$(stat -c %Y "$dir")"
    done
  fi
  find "$root" -maxdepth 4 -path "$root/.shardrecv" -prune -o \
    \( -name '*.replaced-*' -o -name '*.rolled-back-*' \) -prune -print 2>/dev/null |
    while IFS= read -r path; do
      printf 'aside\t%s\t%s\n' "$path" "$(stat -c %Y "$path")"
    done
}

# remove_staging DIR [WAIT]: a transfer's staging directory removed, unless a transfer still
# holds it after WAIT seconds (default 0: not at all).
remove_staging() {
  [ -d "$1" ] || return 0
  if ! flock -w "${2:-0}" "$1/lock" rm -rf "$1"; then
    echo "$1: a transfer still holds it" >&2
    exit "$EX_MISSING"
  fi
}

# installed_root DEST RECORD: "absent" when nothing is at DEST, else the root hash B's
# shardrecv recorded in RECORD when it installed DEST ("unrecorded" when it has none): what a
# transfer ticket's grant must say (create, or replace that tree).
installed_root() {
  if [ ! -e "$1" ] && [ ! -L "$1" ]; then echo absent; return 0; fi
  if [ -f "$2" ]; then cat "$2"; echo; else echo unrecorded; fi
}
