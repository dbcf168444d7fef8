"""SoRA and AdaLoRA under DeepSpeed ZeRO-2/3 on 2 CPU ranks (gloo), launched exactly as the README says.

ZeRO-3 runs use tests/fixtures/zero3_sharded.json (`stage3_param_persistence_threshold: 0`) so that every adapter
tensor and gate of the tiny model is really split across the ranks (checked from the run's summary); with the
default threshold DeepSpeed would keep them whole and the parity would prove nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sora_ds.recipe.checkpoint import point_latest
from tests.support import BNB_CPU_PATHS, REPO, free_port

pytestmark = pytest.mark.distributed


RECIPE = "recipes/llama_sora.py"
BNB_PATH_SCRIPT = "tests/scripts/with_bnb_cpu_path.py"
SHARDED = "tests/fixtures/zero3_sharded.json"
STEPS = 8
QUANT_4BIT = ("{load_in_4bit: true, bnb_4bit_quant_type: nf4, bnb_4bit_use_double_quant: true, "
              "bnb_4bit_compute_dtype: float32, bnb_4bit_quant_storage: float32}")
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))


def run(cmd: list[str], timeout: int = 480) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


# A smaller lr keeps fp32 reduction-order noise (which Adam's normalisation amplifies) well inside 1e-5 on the
# adapters; the absolute threshold still zeroes a good share of the gates within the 8 steps.
SPARSITY = ["--learning_rate", "2e-3", "--threshold_mode", "absolute", "--sparse_lambda", "0.05"]


def recipe_args(out: Path, *extra: str) -> list[str]:
    return [RECIPE, "--max_steps", str(STEPS), "--log_every", "1", "--output_dir", str(out), *SPARSITY, *extra]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (global batch 8) and the same job on 2 ranks under ZeRO-3 and ZeRO-2 (4 per rank)."""
    root = tmp_path_factory.mktemp("dist")
    single = root / "single"
    run([sys.executable, *recipe_args(single, "--per_device_train_batch_size", "8")])
    base = str(single / "base_model")  # both sides start from the very same base weights
    two_ranks = ["--num_processes", "2", "--main_process_port", str(free_port())]
    zero3 = root / "zero3"  # base built from model_config on 2 ranks: must be the single process's base
    run([ACCELERATE, "launch", "--config_file", "launch/accelerate/zero3.yaml", "--deepspeed_config_file", SHARDED,
         *two_ranks, *recipe_args(zero3, "--per_device_train_batch_size", "4", "--save_every", "4")])
    zero2 = root / "zero2"
    two_ranks[-1] = str(free_port())
    run([ACCELERATE, "launch", "--config_file", "launch/accelerate/zero2.yaml", *two_ranks,
         *recipe_args(zero2, "--model_name_or_path", base, "--per_device_train_batch_size", "4")])
    # 4-bit (nf4, quant storage = the model dtype so the packed weights shard) alone and under ZeRO-3, with an eval
    # every 2 steps, on both bitsandbytes CPU paths (an eval repacked the base in place on AVX512-BF16 CPUs).
    q4 = ["--quantization", QUANT_4BIT, "--eval_every", "2"]
    quantized = {}
    for path in BNB_CPU_PATHS:
        forced = [BNB_PATH_SCRIPT, path]
        one, two = root / f"single_4bit_{path}", root / f"zero3_4bit_{path}"
        run([sys.executable, *forced, *recipe_args(one, "--model_name_or_path", base, "--per_device_train_batch_size",
                                                    "8", *q4)])
        run([ACCELERATE, "launch", "--config_file", "launch/accelerate/zero3.yaml", "--deepspeed_config_file", SHARDED,
             "--num_processes", "2", "--main_process_port", str(free_port()), *forced,
             *recipe_args(two, "--model_name_or_path", base, "--per_device_train_batch_size", "4", *q4)])
        quantized[path] = (one, two)
    return {"root": root, "single": single, "zero3": zero3, "zero2": zero2, "base": base, "4bit": quantized}


def assert_same_training(a: Path, b: Path, rtol: float, steps: int = STEPS) -> None:
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, steps + 1))
    for step in la:
        assert abs(la[step] - lb[step]) <= rtol * abs(la[step]), (step, la[step], lb[step])
    sa, sb = summary(a), summary(b)
    assert sa["kept_ranks"] == sb["kept_ranks"]  # the identical set of zeroed gates, module by module
    assert sa["total_kept_ranks"] < sa["total_initial_ranks"]  # the proximal step really pruned
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].shape == tb[key].shape, key
        assert (ta[key] - tb[key]).abs().max().item() <= 1e-5, key


def test_zero3_two_ranks_equals_one_process(runs):
    assert_same_training(runs["single"], runs["zero3"], rtol=1e-4)
    s = summary(runs["zero3"])
    assert (s["zero_stage"], s["num_processes"]) == (3, 2)
    # The adapter and gates were really partitioned: rank 0 held about half of every element.
    assert 0.4 < s["adapter_elements_on_rank"] / s["adapter_elements"] < 0.6
    # Throughput: tokens/s per device is the total over 2 ranks; the FLOPs count sees whole (not sharded) adapters.
    records = list(map(json.loads, (runs["zero3"] / "metrics.jsonl").read_text().splitlines()))
    assert all(r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"] / 2) for r in records)
    assert s["throughput"]["flops_per_token"] == summary(runs["single"])["throughput"]["flops_per_token"]


def test_zero2_two_ranks_equals_one_process(runs):
    assert_same_training(runs["single"], runs["zero2"], rtol=1e-4)
    assert summary(runs["zero2"])["zero_stage"] == 2


def test_base_built_from_config_is_the_same_at_any_process_count(runs):
    """The ZeRO-3 run built its own base from model_config on 2 ranks: the same seed gave the single process's base
    (built once outside zero.Init and saved), and so the same training."""
    one = load_file(runs["single"] / "base_model" / "model.safetensors")
    two = load_file(runs["zero3"] / "base_model" / "model.safetensors")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)


def evals(out: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "eval_loss" in r}


@pytest.mark.parametrize("path", BNB_CPU_PATHS)
def test_4bit_zero3_with_mid_run_evals_equals_4bit_one_process(runs, path):
    one_dir, two_dir = runs["4bit"][path]
    assert_same_training(one_dir, two_dir, rtol=1e-4)
    e1, e2 = evals(one_dir), evals(two_dir)
    assert sorted(e1) == sorted(e2) == [2, 4, 6, 8]
    for step in e1:
        assert abs(e1[step] - e2[step]) <= 1e-4 * e1[step], (step, e1[step], e2[step])
    one, two = summary(one_dir), summary(two_dir)
    assert abs(one["final_eval_loss"] - two["final_eval_loss"]) <= 1e-4 * one["final_eval_loss"]
    assert abs(one["final_eval_token_accuracy"] - two["final_eval_token_accuracy"]) <= 1e-6
    assert two["base_bytes"] == one["base_bytes"] == one["base_bytes_on_rank"]
    # Each rank holds about half of the packed 4-bit base, and the base really is 4-bit (well under fp32 size).
    assert 0.45 < two["base_bytes_on_rank"] / two["base_bytes"] < 0.55
    full_fp32 = summary(runs["single"])["base_bytes"]
    assert one["base_bytes"] < 0.5 * full_fp32


def test_4bit_training_is_the_same_on_both_bnb_cpu_paths(runs):
    """The CPU's features change nothing: the forced AVX512-BF16 path trains and evaluates exactly as the generic."""
    (avx_one, avx_two), (gen_one, gen_two) = (runs["4bit"][p] for p in BNB_CPU_PATHS)
    for a, b in ((avx_one, gen_one), (avx_two, gen_two)):
        assert losses(a) == losses(b) and evals(a) == evals(b)
        assert summary(a)["final_eval_loss"] == summary(b)["final_eval_loss"]


def test_zero3_checkpoint_is_complete_and_atomic(runs):
    ckpts = runs["zero3"] / "checkpoints"
    assert os.readlink(ckpts / "latest") == "checkpoint-8"  # the end of the run is saved too
    assert not [p for p in ckpts.iterdir() if p.name.startswith(".")]  # no half-written folders left behind
    state = json.loads((ckpts / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["step"] == 4
    mid = load_file(ckpts / "checkpoint-4" / "adapter" / "adapter_model.safetensors")
    assert all(t.numel() > 0 for t in mid.values())  # gathered, not the empty ZeRO-3 placeholders


def test_zero3_resume_continues_exactly(runs, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["zero3"], resumed, symlinks=True)
    for name in ("adapter", "summary.json", "checkpoints/checkpoint-8"):  # back to how it was after step 4
        (shutil.rmtree if (resumed / name).is_dir() else os.remove)(resumed / name)
    point_latest(resumed / "checkpoints", "checkpoint-4")
    run([ACCELERATE, "launch", "--config_file", "launch/accelerate/zero3.yaml", "--deepspeed_config_file", SHARDED,
         "--num_processes", "2", "--main_process_port", str(free_port()),
         *recipe_args(resumed, "--model_name_or_path", runs["base"], "--per_device_train_batch_size", "4",
                      "--save_every", "4", "--resume_from", "latest",
                      # the same weights as the checkpoint's base (built from the config), at another path
                      "--resume_allow_changes", "[model_name_or_path]")])
    assert_same_training(runs["zero3"], resumed, rtol=1e-6)


def test_two_machines_over_loopback_form_one_job(runs, tmp_path):
    """`accelerate launch --num_machines 2` twice (machine rank 0 and 1) rendezvous over 127.0.0.1 and train."""
    out = tmp_path / "two_nodes"
    port = str(free_port())
    common = [ACCELERATE, "launch", "--config_file", "launch/accelerate/zero3.yaml", "--deepspeed_config_file",
              SHARDED, "--num_machines", "2", "--num_processes", "2", "--main_process_ip", "127.0.0.1",
              "--main_process_port", port]
    args = recipe_args(out, "--model_name_or_path", runs["base"], "--per_device_train_batch_size", "4")
    procs = [
        subprocess.Popen([*common, "--machine_rank", str(rank), *args], cwd=REPO, env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in (0, 1)
    ]
    outputs = [p.communicate(timeout=480)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    s = summary(out)
    assert s["num_processes"] == 2
    assert_same_training(runs["single"], out, rtol=1e-4)


def test_deepspeed_launcher_with_deepspeed_config_key(runs, tmp_path):
    """The `deepspeed` launcher (as launch/deepspeed_hostfile.sh uses it) starts the recipe, which builds the
    DeepSpeed plugin from its `deepspeed_config` key and accepts the launcher's --local_rank."""
    out = tmp_path / "ds_launcher"
    deepspeed = str(Path(sys.executable).with_name("deepspeed"))
    run([deepspeed, "--num_gpus", "2", "--master_port", str(free_port()),
         *recipe_args(out, "--model_name_or_path", runs["base"], "--per_device_train_batch_size", "4",
                      "--deepspeed_config", SHARDED)])
    s = summary(out)
    assert (s["zero_stage"], s["num_processes"]) == (3, 2)
    assert_same_training(runs["single"], out, rtol=1e-4)


# AdaLoRA: 12 steps, full budget for 2, cubic decrease re-allocated every 2 steps, final mask from step 8.
ADALORA = "recipes/llama_adalora.py"
ADALORA_STEPS = 12
ADALORA_SCHEDULE = ["--max_steps", str(ADALORA_STEPS), "--t_init", "2", "--t_final", "4", "--delta_t", "2",
                    "--learning_rate", "2e-3", "--log_every", "1"]


@pytest.fixture(scope="module")
def adalora_runs(runs):
    """AdaLoRA on one process and on 2 ranks under ZeRO-3 (through tests/scripts/adalora_master_check.py: the
    recipe plus a look into the fp32 master after every step), ZeRO-2, and 4-bit under ZeRO-3; same base."""
    root, base = runs["root"], runs["base"]

    def args(out: Path, per_device: int, *extra: str) -> list[str]:
        return [*ADALORA_SCHEDULE, "--output_dir", str(out), "--model_name_or_path", base,
                "--per_device_train_batch_size", str(per_device), *extra]

    def zero(config: str, script: str, out: Path, *extra: str) -> None:
        sharded = ["--deepspeed_config_file", SHARDED] if config.endswith("zero3.yaml") else []
        run([ACCELERATE, "launch", "--config_file", config, *sharded, "--num_processes", "2", "--main_process_port",
             str(free_port()), script, *args(out, 4, *extra)])

    q4 = ["--quantization", QUANT_4BIT]
    out = {name: root / f"adalora_{name}" for name in ("single", "zero3", "zero2", "single_4bit", "zero3_4bit")}
    run([sys.executable, ADALORA, *args(out["single"], 8)])
    zero("launch/accelerate/zero3.yaml", "tests/scripts/adalora_master_check.py", out["zero3"])
    zero("launch/accelerate/zero2.yaml", ADALORA, out["zero2"])
    run([sys.executable, ADALORA, *args(out["single_4bit"], 8, *q4)])
    zero("launch/accelerate/zero3.yaml", ADALORA, out["zero3_4bit"], *q4)
    return out


def assert_same_allocation(a: Path, b: Path) -> None:
    """Same per-step losses and budgets, the same surviving triplets module by module, the same exported adapter."""
    assert_same_training(a, b, rtol=1e-4, steps=ADALORA_STEPS)
    ra, rb = (list(map(json.loads, (o / "metrics.jsonl").read_text().splitlines())) for o in (a, b))
    assert [(r["budget"], r["active_ranks"]) for r in ra] == [(r["budget"], r["active_ranks"]) for r in rb]
    s = summary(a)
    assert s["method"] == "adalora"
    assert s["total_kept_ranks"] == 8 * len(s["kept_ranks"])  # the global budget: an average rank of 8
    assert len(set(s["kept_ranks"].values())) > 1  # spread unevenly over the matrices


def test_adalora_zero3_two_ranks_allocates_as_one_process(adalora_runs):
    assert_same_allocation(adalora_runs["single"], adalora_runs["zero3"])
    s = summary(adalora_runs["zero3"])
    assert (s["zero_stage"], s["num_processes"]) == (3, 2)
    assert 0.4 < s["adapter_elements_on_rank"] / s["adapter_elements"] < 0.6  # P, Q and E really split


def test_adalora_masks_stick_in_the_zero3_fp32_master(adalora_runs):
    """After every optimizer step, every pruned E is exactly zero in DeepSpeed's fp32 master (so the next step
    starts from it, not from a revived value), and from the final allocation on exactly the budget survives."""
    records = [json.loads(line) for line in (adalora_runs["zero3"] / "master_check.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, ADALORA_STEPS + 1))
    assert all(r["pruned_nonzero_in_master"] == 0 for r in records)
    assert max(r["pruned"] for r in records) > 0
    final = [r for r in records if r["step"] >= ADALORA_STEPS - 4]
    assert all(r["kept_nonzero_in_master"] == r["budget"] == 8 * 14 for r in final)


def test_adalora_zero2_two_ranks_allocates_as_one_process(adalora_runs):
    assert_same_allocation(adalora_runs["single"], adalora_runs["zero2"])
    assert summary(adalora_runs["zero2"])["zero_stage"] == 2


def test_adalora_4bit_zero3_two_ranks_allocates_as_4bit_one_process(adalora_runs):
    assert_same_allocation(adalora_runs["single_4bit"], adalora_runs["zero3_4bit"])
    two = summary(adalora_runs["zero3_4bit"])
    assert 0.45 < two["base_bytes_on_rank"] / two["base_bytes"] < 0.55


def test_trainer_adalora_zero3_two_ranks_equals_one_process(tmp_path):
    """AdapterTrainer (transformers Trainer) with AdaLoRA under ZeRO-3 on 2 ranks (torchrun, the Trainer's own
    DeepSpeed integration) against the same script on one process: same losses, budgets and surviving triplets."""
    script = "tests/scripts/trainer_adalora.py"
    run([sys.executable, script, str(tmp_path / "one"), "8"])
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), script, str(tmp_path / "two"), "4",
         SHARDED])
    one, two = (json.loads((tmp_path / name / "result.json").read_text()) for name in ("one", "two"))
    assert len(one["losses"]) == 10
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-5)
    assert two["budgets"] == one["budgets"] and one["budgets"][-1] == 12
    assert two["kept"] == one["kept"] and sum(one["kept"].values()) == 12
    assert 0.4 < two["adapter_elements_on_rank"] / two["adapter_elements"] < 0.6
