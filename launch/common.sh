#!/usr/bin/env bash
# Helpers shared by the launch scripts in this folder; they `source` it. Not a launcher itself.
# Expects SORA_ROOT (the repository root) and PROG (the calling script's name) to be set by the caller.
set -euo pipefail

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
    echo "launch/common.sh holds helpers for the launch scripts (single_node.sh, multi_node.sh, slurm.sbatch,"
    echo "deepspeed_hostfile.sh); run one of those with --help."
    [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && exit 0
    exit 2
fi

die() {
    echo "$PROG: error: $*" >&2
    echo "Run '$PROG --help' for usage." >&2
    exit 2
}

# need_value OPTION "$#": an option that takes a value must be followed by one.
need_value() {
    (($2 >= 2)) || die "$1 needs a value"
}

# check_int OPTION VALUE MIN: VALUE is an integer >= MIN.
check_int() {
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be an integer, got '$2'"
    ((10#$2 >= $3)) || die "$1 must be >= $3, got $2"
}

check_port() {
    check_int "$1" "$2" 0
    ((10#$2 <= 65535)) || die "$1 must be a port number (0-65535), got $2"
}

# resolve_file OPTION PATH: an absolute path for PATH, taken relative to the current directory when it exists
# there, else relative to the repository root (so `--recipe recipes/llama_sora.py` works from anywhere).
resolve_file() {
    local opt=$1 path=$2
    if [[ -f "$path" ]]; then
        echo "$(cd -- "$(dirname -- "$path")" && pwd -P)/$(basename -- "$path")"
    elif [[ "$path" != /* && -f "$SORA_ROOT/$path" ]]; then
        echo "$SORA_ROOT/$path"
    else
        die "$opt: no such file: '$path' (looked in $PWD and in $SORA_ROOT)"
    fi
}

# detect_gpus: sets GPU_COUNT to the number of CUDA devices torch sees (0 without nvidia-smi: no torch import
# then). With none, exports DS_ACCELERATOR=cpu (unless already set) so DeepSpeed picks its CPU accelerator; the
# recipe itself asks accelerate for the gloo backend, so the same command runs N CPU processes.
detect_gpus() {
    GPU_COUNT=0
    if command -v nvidia-smi >/dev/null 2>&1; then
        GPU_COUNT=$("${PYTHON:-python}" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' \
            2>/dev/null || echo 0)
        [[ "$GPU_COUNT" =~ ^[0-9]+$ ]] || GPU_COUNT=0
    fi
    if ((GPU_COUNT == 0)) && [[ -z "${DS_ACCELERATOR:-}" ]]; then
        export DS_ACCELERATOR=cpu
        echo "$PROG: no CUDA device visible: DS_ACCELERATOR=cpu, processes run on CPU (gloo)" >&2
    fi
}

# accelerate_config_args CONFIG: the `accelerate launch` options for an accelerate YAML: --config_file, plus
# --deepspeed_config_file with an absolute path when the YAML names a relative one (accelerate would read it
# relative to the current directory; here it is relative to the repository root, or to the current directory
# when the file exists there).
accelerate_config_args() {
    local cfg=$1 ds
    ACCEL_ARGS=(--config_file "$cfg")
    ds=$(sed -nE "s/^[[:space:]]+deepspeed_config_file:[[:space:]]*['\"]?([^'\"#]*[^'\"#[:space:]])['\"]?[[:space:]]*(#.*)?$/\1/p" "$cfg" | head -n1)
    if [[ -n "$ds" ]]; then
        ACCEL_ARGS+=(--deepspeed_config_file "$(resolve_file "deepspeed_config_file in $cfg" "$ds")")
    elif ((${GPU_COUNT:-0} == 0)) && [[ -z "${ACCELERATE_USE_CPU:-}" ]]; then
        # Without a GPU, a MULTI_GPU (DDP) config would give every rank distributed_type NO: unsynchronised
        # replicas. ACCELERATE_USE_CPU makes accelerate treat the ranks as MULTI_CPU (gloo, gradients all-reduced).
        # Not for DeepSpeed configs: accelerate refuses DeepSpeed in its CPU mode (DS_ACCELERATOR=cpu covers them).
        export ACCELERATE_USE_CPU=true
        echo "$PROG: no CUDA device visible: ACCELERATE_USE_CPU=true (DDP over gloo on CPU)" >&2
    fi
}

# run_or_print CMD...: print the command (shell-quoted) to stderr, then run it in place of this shell; with
# DRY_RUN=1 print it to stdout and stop.
run_or_print() {
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        printf '%q ' "$@" | sed 's/ $//'
        echo
        exit 0
    fi
    { printf '+ '; printf '%q ' "$@"; echo; } >&2
    exec "$@"
}

# The recipes import sora_ds from this checkout, whether or not it is pip-installed, from any directory.
export PYTHONPATH="$SORA_ROOT${PYTHONPATH:+:$PYTHONPATH}"
