#!/usr/bin/env bash
# Several machines: run this once on every machine, with the same arguments except --machine-rank.
set -euo pipefail

PROG=$(basename -- "$0")
SORA_ROOT=$(dirname -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)")
# shellcheck source=launch/common.sh
source "$SORA_ROOT/launch/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --num-machines N --machine-rank R --main-process-ip IP --main-process-port P
             [--gpus-per-node G] [--rdzv-backend static|c10d] [--recipe SCRIPT] [--accelerate-config YAML]
             [--dry-run] [--] [RECIPE ARGS...]

Train on N machines with G processes each. Run the same command on every machine, changing only
--machine-rank (0 on the machine whose address is IP):
  accelerate launch --config_file YAML --num_machines N --machine_rank R --main_process_ip IP
                    --main_process_port P --num_processes N*G SCRIPT RECIPE ARGS...

Required:
  --num-machines N          number of machines (>= 1)
  --machine-rank R          this machine's rank, 0 .. N-1
  --main-process-ip IP      address of machine 0, reachable from every machine
  --main-process-port P     a free port on machine 0

Options:
  --gpus-per-node G         processes per machine (default: the number of visible CUDA GPUs; required without one)
  --rdzv-backend B          torchrun rendezvous: static (default; ranks follow --machine-rank) or c10d
  --recipe SCRIPT           recipe script (default: recipes/llama_sora.py)
  --accelerate-config YAML  accelerate config (default: launch/accelerate/zero3.yaml)
  --dry-run                 print the command instead of running it
  -h, --help                show this help and exit

Everything after '--', and every argument not listed above, goes to the recipe (--config FILE.yaml, --key value).
Every machine must see the repository and the data at the same paths (shared file system or identical copies).
Without a CUDA GPU the processes run on CPU with gloo (DS_ACCELERATOR=cpu is set).

Example (2 machines x 8 GPUs; on the second machine use --machine-rank 1):
  $PROG --num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 --main-process-port 29500 \\
      --gpus-per-node 8 -- --config my_run.yaml
EOF
}

NUM_MACHINES="" MACHINE_RANK="" MAIN_IP="" MAIN_PORT="" GPUS_PER_NODE="" RDZV="static"
RECIPE="recipes/llama_sora.py" ACCEL_CONFIG="launch/accelerate/zero3.yaml" DRY_RUN=0
EXTRA=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --num-machines) need_value "$1" $#; NUM_MACHINES=$2; shift 2 ;;
        --num-machines=*) NUM_MACHINES=${1#*=}; shift ;;
        --machine-rank) need_value "$1" $#; MACHINE_RANK=$2; shift 2 ;;
        --machine-rank=*) MACHINE_RANK=${1#*=}; shift ;;
        --main-process-ip) need_value "$1" $#; MAIN_IP=$2; shift 2 ;;
        --main-process-ip=*) MAIN_IP=${1#*=}; shift ;;
        --main-process-port) need_value "$1" $#; MAIN_PORT=$2; shift 2 ;;
        --main-process-port=*) MAIN_PORT=${1#*=}; shift ;;
        --gpus-per-node) need_value "$1" $#; GPUS_PER_NODE=$2; shift 2 ;;
        --gpus-per-node=*) GPUS_PER_NODE=${1#*=}; shift ;;
        --rdzv-backend) need_value "$1" $#; RDZV=$2; shift 2 ;;
        --rdzv-backend=*) RDZV=${1#*=}; shift ;;
        --recipe) need_value "$1" $#; RECIPE=$2; shift 2 ;;
        --recipe=*) RECIPE=${1#*=}; shift ;;
        --accelerate-config) need_value "$1" $#; ACCEL_CONFIG=$2; shift 2 ;;
        --accelerate-config=*) ACCEL_CONFIG=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

missing=()
[[ -n "$NUM_MACHINES" ]] || missing+=(--num-machines)
[[ -n "$MACHINE_RANK" ]] || missing+=(--machine-rank)
[[ -n "$MAIN_IP" ]] || missing+=(--main-process-ip)
[[ -n "$MAIN_PORT" ]] || missing+=(--main-process-port)
((${#missing[@]} == 0)) || die "missing required argument(s): ${missing[*]}"
check_int --num-machines "$NUM_MACHINES" 1
check_int --machine-rank "$MACHINE_RANK" 0
((10#$MACHINE_RANK < 10#$NUM_MACHINES)) || die "--machine-rank must be < --num-machines ($NUM_MACHINES), got $MACHINE_RANK"
check_port --main-process-port "$MAIN_PORT"
((10#$MAIN_PORT > 0)) || die "--main-process-port must be a fixed port (> 0) shared by all machines"
[[ "$RDZV" == static || "$RDZV" == c10d ]] || die "--rdzv-backend must be static or c10d, got '$RDZV'"
RECIPE=$(resolve_file --recipe "$RECIPE")
ACCEL_CONFIG=$(resolve_file --accelerate-config "$ACCEL_CONFIG")
detect_gpus
if [[ -z "$GPUS_PER_NODE" ]]; then
    ((GPU_COUNT > 0)) || die "--gpus-per-node is required when no CUDA GPU is visible (it is then the number of CPU processes)"
    GPUS_PER_NODE=$GPU_COUNT
fi
check_int --gpus-per-node "$GPUS_PER_NODE" 1

accelerate_config_args "$ACCEL_CONFIG"
CMD=(accelerate launch "${ACCEL_ARGS[@]}"
    --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK"
    --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" --rdzv_backend "$RDZV"
    --num_processes $((10#$NUM_MACHINES * 10#$GPUS_PER_NODE)))
run_or_print "${CMD[@]}" "$RECIPE" "${EXTRA[@]}"
