#!/usr/bin/env bash
# The DeepSpeed launcher with a hostfile (pdsh/ssh from one machine), for clusters without SLURM.
set -euo pipefail

PROG=$(basename -- "$0")
SORA_ROOT=$(dirname -- "$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)")
# shellcheck source=launch/common.sh
source "$SORA_ROOT/launch/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --hostfile FILE [--num-gpus G] [--master-port P] [--master-addr ADDR] [--ds-config JSON]
             [--launcher NAME] [--no-ssh-check] [--recipe SCRIPT] [--dry-run] [--] [RECIPE ARGS...]

Train on the machines of a DeepSpeed hostfile, started from one machine by the deepspeed launcher:
  deepspeed --hostfile FILE --master_port P [--num_gpus G] SCRIPT --deepspeed_config JSON RECIPE ARGS...
The launcher passes --local_rank=N to the recipe (which ignores it and reads LOCAL_RANK); the recipe builds its
DeepSpeed setup from the deepspeed_config key (no accelerate config is involved).

Required:
  --hostfile FILE     lines "<host> slots=<GPUs>" (see launch/hostfile.example)

Options:
  --num-gpus G        use at most G GPUs per host (default: every slot of the hostfile)
  --master-port P     rendezvous port (default: 29500)
  --master-addr ADDR  address of the first host (default: the launcher asks it over ssh)
  --ds-config JSON    DeepSpeed config (default: ds_configs/zero3.json; also zero2.json, zero3_offload.json)
  --launcher NAME     multi-node backend of the deepspeed launcher: pdsh (default), openmpi, mvapich, mpich, impi,
                      slurm
  --no-ssh-check      skip the launcher's passwordless-ssh check (e.g. a hostfile naming only localhost)
  --recipe SCRIPT     recipe script (default: recipes/llama_sora.py)
  --dry-run           print the command instead of running it
  -h, --help          show this help and exit

Everything after '--', and every argument not listed above, goes to the recipe (--config FILE.yaml, --key value).
The hosts need passwordless ssh to each other, the same paths for the repository and data, and the same Python
environment; the launcher forwards PYTHON*/NCCL*/UCX* variables (PYTHONPATH included) and those in a
.deepspeed_env file in the current or home directory. When the hostfile names only this machine (localhost) and
no CUDA GPU is visible, DS_ACCELERATOR=cpu is set and the ranks run on CPU (gloo): e.g. a hostfile
'localhost slots=2' with --no-ssh-check --master-addr 127.0.0.1.

Example (2 hosts x 8 GPUs):
  $PROG --hostfile my_hostfile --master-port 29500 -- --config my_run.yaml
EOF
}

HOSTFILE="" NUM_GPUS="" MASTER_PORT=29500 MASTER_ADDR="" DS_CONFIG="ds_configs/zero3.json" LAUNCHER=""
NO_SSH_CHECK=0 RECIPE="recipes/llama_sora.py" DRY_RUN=0
EXTRA=()
while (($#)); do
    case "$1" in
        -h | --help) usage; exit 0 ;;
        --hostfile) need_value "$1" $#; HOSTFILE=$2; shift 2 ;;
        --hostfile=*) HOSTFILE=${1#*=}; shift ;;
        --num-gpus) need_value "$1" $#; NUM_GPUS=$2; shift 2 ;;
        --num-gpus=*) NUM_GPUS=${1#*=}; shift ;;
        --master-port) need_value "$1" $#; MASTER_PORT=$2; shift 2 ;;
        --master-port=*) MASTER_PORT=${1#*=}; shift ;;
        --master-addr) need_value "$1" $#; MASTER_ADDR=$2; shift 2 ;;
        --master-addr=*) MASTER_ADDR=${1#*=}; shift ;;
        --ds-config) need_value "$1" $#; DS_CONFIG=$2; shift 2 ;;
        --ds-config=*) DS_CONFIG=${1#*=}; shift ;;
        --launcher) need_value "$1" $#; LAUNCHER=$2; shift 2 ;;
        --launcher=*) LAUNCHER=${1#*=}; shift ;;
        --no-ssh-check) NO_SSH_CHECK=1; shift ;;
        --recipe) need_value "$1" $#; RECIPE=$2; shift 2 ;;
        --recipe=*) RECIPE=${1#*=}; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        --) shift; EXTRA+=("$@"); break ;;
        *) EXTRA+=("$1"); shift ;;
    esac
done

[[ -n "$HOSTFILE" ]] || die "missing required argument: --hostfile"
HOSTFILE=$(resolve_file --hostfile "$HOSTFILE")
grep -qE '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=[0-9]+' "$HOSTFILE" \
    || die "--hostfile $HOSTFILE has no '<host> slots=<N>' line"
[[ -z "$NUM_GPUS" ]] || check_int --num-gpus "$NUM_GPUS" 1
check_port --master-port "$MASTER_PORT"
((10#$MASTER_PORT > 0)) || die "--master-port must be a fixed port (> 0)"
RECIPE=$(resolve_file --recipe "$RECIPE")
DS_CONFIG=$(resolve_file --ds-config "$DS_CONFIG")
# CPU mode only when every host is this machine: the launcher may run on a login node without GPUs, and some
# backends (slurm) would carry DS_ACCELERATOR=cpu to GPU hosts. Remote hosts pick their accelerator themselves.
local_only=1
while read -r host _; do
    case "$host" in
        localhost | 127.* | "$(hostname)" | "$(hostname -s 2>/dev/null || hostname)") ;;
        *) local_only=0 ;;
    esac
done < <(grep -E '^[[:space:]]*[^#[:space:]]+[[:space:]]+slots=' "$HOSTFILE")
((local_only == 0)) || detect_gpus

CMD=(deepspeed --hostfile "$HOSTFILE" --master_port "$MASTER_PORT")
[[ -z "$NUM_GPUS" ]] || CMD+=(--num_gpus "$NUM_GPUS")
[[ -z "$MASTER_ADDR" ]] || CMD+=(--master_addr "$MASTER_ADDR")
[[ -z "$LAUNCHER" ]] || CMD+=(--launcher "$LAUNCHER")
((NO_SSH_CHECK == 0)) || CMD+=(--no_ssh_check)
run_or_print "${CMD[@]}" "$RECIPE" --deepspeed_config "$DS_CONFIG" "${EXTRA[@]}"
