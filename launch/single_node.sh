#!/usr/bin/env bash
# One machine, N processes: accelerate launch with an accelerate config (ZeRO-3 by default).
set -euo pipefail

PROG=$(basename -- "$0")
SORA_ROOT=$(dirname -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)")
# shellcheck source=launch/common.sh
source "$SORA_ROOT/launch/common.sh"

usage() {
    cat <<EOF
Usage: $PROG [--gpus N] [--recipe SCRIPT] [--accelerate-config YAML] [--main-process-port P] [--dry-run]
             [--] [RECIPE ARGS...]

Train on one machine with N processes (one per GPU):
  accelerate launch --config_file YAML --num_processes N --num_machines 1 SCRIPT RECIPE ARGS...

Options:
  --gpus N                  processes to start (default: the number of visible CUDA GPUs; required without a GPU)
  --recipe SCRIPT           recipe script (default: recipes/llama_sora.py)
  --accelerate-config YAML  accelerate config (default: launch/accelerate/zero3.yaml; also ddp.yaml, zero2.yaml,
                            zero3_offload.yaml, fsdp2.yaml in launch/accelerate/)
  --main-process-port P     rendezvous port (default: accelerate's 29500; 0 picks a free one)
  --dry-run                 print the command instead of running it
  -h, --help                show this help and exit

Everything after '--', and every argument not listed above, goes to the recipe: --config FILE.yaml and
--key value overrides of any recipe config key. Paths to files in this repository may be given relative to the
repository root; all other relative paths are relative to the current directory (as is the recipe's output_dir).

Without a CUDA GPU the same command runs N CPU processes: the script sets DS_ACCELERATOR=cpu and the recipe
asks accelerate for the gloo backend (e.g. '$PROG --gpus 2' runs 2 CPU ranks).

Examples:
  $PROG --gpus 8 -- --config my_run.yaml
  $PROG --gpus 2 --max_steps 10
  $PROG --gpus 4 --accelerate-config launch/accelerate/ddp.yaml --config my_run.yaml --r 16
EOF
}

GPUS="" RECIPE="recipes/llama_sora.py" ACCEL_CONFIG="launch/accelerate/zero3.yaml" PORT="" DRY_RUN=0
EXTRA=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --gpus) need_value "$1" $#; GPUS=$2; shift 2 ;;
        --gpus=*) GPUS=${1#*=}; shift ;;
        --recipe) need_value "$1" $#; RECIPE=$2; shift 2 ;;
        --recipe=*) RECIPE=${1#*=}; shift ;;
        --accelerate-config) need_value "$1" $#; ACCEL_CONFIG=$2; shift 2 ;;
        --accelerate-config=*) ACCEL_CONFIG=${1#*=}; shift ;;
        --main-process-port) need_value "$1" $#; PORT=$2; shift 2 ;;
        --main-process-port=*) PORT=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

RECIPE=$(resolve_file --recipe "$RECIPE")
ACCEL_CONFIG=$(resolve_file --accelerate-config "$ACCEL_CONFIG")
[[ -z "$PORT" ]] || check_port --main-process-port "$PORT"
detect_gpus
if [[ -z "$GPUS" ]]; then
    ((GPU_COUNT > 0)) || die "--gpus is required when no CUDA GPU is visible (it is then the number of CPU processes)"
    GPUS=$GPU_COUNT
fi
check_int --gpus "$GPUS" 1

accelerate_config_args "$ACCEL_CONFIG"
CMD=(accelerate launch "${ACCEL_ARGS[@]}" --num_processes "$GPUS" --num_machines 1 --machine_rank 0)
[[ -z "$PORT" ]] || CMD+=(--main_process_port "$PORT")
run_or_print "${CMD[@]}" "$RECIPE" "${EXTRA[@]}"
