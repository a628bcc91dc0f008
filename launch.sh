#!/usr/bin/env bash
# The one entry point. Bootstraps .venv from pyproject.toml on first use (and again
# whenever pyproject.toml changes), then dispatches to a program in experiments/.
# Every command takes --help (or -h): its usage and every flag. Flags are absl's:
# --name=VALUE or --name VALUE, underscores canonical (--dry-run = --dry_run).
# Relative paths (configs, --workdir, --out, ...) are taken from your directory.
#
#   ./launch.sh run  [CONFIG[:ARGS]] [--workdir DIR] [--config.KEY=VALUE ...] [--print_config]
#                    [--procs N [--devices_per_proc K] | --slurm --nodes N [--gpus_per_node G] | --tpu NAME --zone Z] [--dry_run]
#   ./launch.sh sweep CONFIG[:ARGS] [--config.KEY=VALUE ...] [--parallel K | --slurm [--dry_run]] [--collect]
#   ./launch.sh eval --workdir DIR
#   ./launch.sh eval (--workdir DIR | --hf PATH) --benchmarks cifar10,folder:PATH,captions:FILE [--tasks ...]
#   ./launch.sh embed (--workdir DIR | --hf PATH) [--images FOLDER] [--texts FILE] --out FILE.npz
#   ./launch.sh search --index FILE.npz (--text "a red circle" | --image PATH) [--k 5]
#   ./launch.sh ask --workdir DIR --image PATH "what colour is the square?"   (PATH: a file or a folder)
#   ./launch.sh caption --workdir DIR --image PATH
#   ./launch.sh sample --workdir DIR --prompt "a red circle" [--n 16 --cfg 3.0 --steps 50 --sampler ddim]
#   ./launch.sh bench [--families clip,dit,vlm] [--out FILE] [--profile DIR] [--smoke]
#   ./launch.sh bench-flags [--families clip,dit] [--xla_flags F1,F2] [--out FILE]
#   ./launch.sh configs [NAME ...]     the configs in configs/, their descriptions and args
#   ./launch.sh test [PYTEST ARGS]
#   ./launch.sh install                 build or refresh .venv, then exit
#   ./launch.sh help [COMMAND]          this text, or COMMAND --help
set -euo pipefail
# launch.sh runs everything from the repository; relative paths on the command
# line are the caller's (multimodal/config/config_lib.py, experiments/flags_cli.py).
export MM_CALLER_DIR="$PWD"
cd "$(dirname "$0")"
root=$(pwd)
commands="run, sweep, eval, sample, embed, search, ask, caption, bench, bench-flags, configs, test, install, help"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

cmd="${1:-run}"
[ $# -gt 0 ] && shift
# Help needs no .venv: it is answered before the bootstrap.
case "$cmd" in
  -h|--help|help)
    if [ $# -gt 0 ] && [ "$1" != help ]; then
      exec "$0" "$1" --help
    fi
    usage
    exit 0 ;;
  install)
    if [ $# -gt 0 ]; then
      case "$1" in
        -h|--help) echo "./launch.sh install: create .venv (python3 -m venv) and pip install -e '.[test]' into it, or refresh it when pyproject.toml changed; then exit. Every other command does this first when needed."; exit 0 ;;
        *) echo "error: install takes no arguments (got '$1'). ./launch.sh install --help explains it." >&2; exit 2 ;;
      esac
    fi ;;
  run|sweep|eval|sample|embed|search|ask|caption|bench|bench-flags|configs|test) ;;
  *)
    echo "error: unknown command '$cmd'. Commands: $commands (./launch.sh help describes them)." >&2
    exit 2 ;;
esac

venv="$root/.venv"
stamp="$venv/.pyproject.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "launch.sh: installing the environment into .venv (pyproject.toml is new or changed)..." >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e ".[test]" >&2
  echo "$want" > "$stamp"
fi
[ "$cmd" = install ] && { echo "launch.sh: .venv is up to date with pyproject.toml." >&2; exit 0; }
py="$venv/bin/python"
# For the programs' messages: `./launch.sh eval --help`, not `python -m ...`.
export MM_COMMAND="$cmd"

# Quiet TensorFlow's C++ start-up chatter; it only ever feeds the input
# pipeline (decode, resize, tokenize), where oneDNN's custom kernels buy nothing.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export TF_ENABLE_ONEDNN_OPTS="${TF_ENABLE_ONEDNN_OPTS:-0}"

# Keep freed memory in the process. By default glibc hands every large freed
# block back to the kernel, so each run of a jitted step page-faults its
# buffers in again: 200k faults per CLIP bench step, a third of its time on a
# 2-core VM. No mmap for large blocks, no trimming of the heap, and the heap
# on transparent huge pages where the kernel offers them (docs/performance.md).
# Ours come first, so a GLIBC_TUNABLES of the caller's wins (once: a
# launch.sh started by another, as --procs and --slurm do, adds nothing).
malloc_tunables="glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.hugetlb=1"
case "${GLIBC_TUNABLES:-}" in
  *"$malloc_tunables"*) ;;
  *) export GLIBC_TUNABLES="$malloc_tunables${GLIBC_TUNABLES:+:$GLIBC_TUNABLES}" ;;
esac

case "$cmd" in
  run)
    exec "$py" -m experiments.train "$@" ;;
  sweep)
    exec "$py" -m experiments.sweep "$@" ;;
  eval)
    exec "$py" -m experiments.evaluate "$@" ;;
  sample)
    exec "$py" -m experiments.sample "$@" ;;
  embed)
    exec "$py" -m experiments.embed "$@" ;;
  ask)
    exec "$py" -m experiments.ask "$@" ;;
  caption)
    exec "$py" -m experiments.caption "$@" ;;
  bench)
    exec "$py" -m experiments.bench "$@" ;;
  bench-flags)
    exec "$py" -m experiments.bench_flags "$@" ;;
  search)
    exec "$py" -m experiments.search "$@" ;;
  configs)
    exec "$py" -m experiments.configs_list "$@" ;;
  test)
    # The tests start programs from the repository with paths of their own.
    unset MM_CALLER_DIR MM_COMMAND
    # 8 simulated CPU devices so the sharding tests see a real mesh.
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=8"
    # Two workers: much of a test's time is single-threaded (compiling,
    # tf.data start-up, subprocesses starting), which the other core fills.
    # PYTEST_WORKERS=0 runs in one process.
    exec "$py" -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup "$@" ;;
esac
