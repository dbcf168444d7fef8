"""SoRA on bitsandbytes 4-bit / 8-bit bases on CPU: training, gradients, pruning, export, merge, refusals.

Tests that take ``bnb_cpu_path`` run on both of bitsandbytes' CPU code paths (AVX512-BF16 and generic), whatever this
machine's CPU is (see conftest.py); ``test_forced_cpu_path_is_the_real_one`` proves the forcing takes effect."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import subprocess
import sys
import types
import warnings

import pytest
import torch
from packaging.version import Version

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

import sora_ds  # noqa: E402
from sora_ds.engine.quantized import (HUB_KERNEL_NOTICE, check_4bit_layout, dequantized_weight,  # noqa: E402
                                      pin_4bit_layout, quantized_kind)
from sora_ds.recipe.train import check_quantization  # noqa: E402
from sora_ds.recipe.config import ConfigError, TrainConfig  # noqa: E402
from tests.support import REPO, SORA_DEMO  # noqa: E402

pytestmark = pytest.mark.unit

TARGETS = ["q_proj", "v_proj", "down_proj"]
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}


def save_base(path, hidden_size=64, intermediate_size=128, heads=4):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=hidden_size, intermediate_size=intermediate_size, num_hidden_layers=2,
                      num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("qbase"))


@pytest.fixture(scope="module")
def odd_base_dir(tmp_path_factory):
    """Widths that are not multiples of 32 (bitsandbytes' AVX512-BF16 eval kernel asserts N % 32 == 0)."""
    return save_base(tmp_path_factory.mktemp("qbase_odd"), hidden_size=40, intermediate_size=100, heads=2)


def load(base_dir, kind):
    return AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**QUANT[kind]), device_map="cpu", dtype=torch.float32
    )


def pinned(model):
    pin_4bit_layout(model)
    return model


def eval_logits(model, ids):
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.train(was_training)
    return logits


def train_sora(model, steps=25, sparse_lambda=3.0, eval_at=()):
    """Train on one fixed batch; an eval forward (eval mode, no grad) after each step in ``eval_at``."""
    sora_ds.inject(model, sora_ds.SoRAConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_seed=0))
    opt = sora_ds.build_optimizer(model, learning_rate=1e-2, sparse_lambda=sparse_lambda)
    ids = torch.randint(0, 96, (4, 24), generator=torch.Generator().manual_seed(1))
    losses, grads = [], set()
    model.train()
    for step in range(steps):
        if step in eval_at:
            eval_logits(model, ids)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if step == 0:
            grads = {n for n, p in model.named_parameters() if p.grad is not None}
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, grads, ids


# bitsandbytes' CPU ops module, imported again as on a CPU with AVX512-BF16 (it picks its kernels at import time).
IMPORT_AS_AVX512_BF16 = """
import importlib, bitsandbytes, bitsandbytes.functional as F
F.has_avx512bf16 = lambda: True
importlib.reload(importlib.import_module("bitsandbytes.backends.cpu.ops"))
"""


@pytest.mark.parametrize("first", ["", "import sora_ds"])
def test_no_hub_kernel_notice_on_avx512_bf16_cpus(first):
    """bitsandbytes >= 0.50 warns at import, on AVX512-BF16 CPUs, that the optional `kernels` package is missing (it
    showed up in `sora-ds generate`'s reply). Without sora_ds the notice is there (so this checks the real message);
    with sora_ds imported first it is not."""
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", f"{first}\n{IMPORT_AS_AVX512_BF16}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    warns = Version(bnb.__version__) >= Version("0.50") and importlib.util.find_spec("kernels") is None and not first
    assert (HUB_KERNEL_NOTICE in proc.stderr) == warns, proc.stderr


def test_hub_kernel_notice_filter_keeps_other_failures(caplog):
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger=log.name):
        log.warning(f"{HUB_KERNEL_NOTICE}: %s.", ModuleNotFoundError("No module named 'kernels'", name="kernels"))
        log.warning(f"{HUB_KERNEL_NOTICE}: %s.", OSError("offline, kernel not in the Hub cache"))
    assert [r.getMessage() for r in caplog.records] == [f"{HUB_KERNEL_NOTICE}: offline, kernel not in the Hub cache."]


def test_forced_cpu_path_is_the_real_one(base_dir, bnb_cpu_path):
    """The forcing in conftest.py works: on the AVX512-BF16 path an eval forward of a plain bitsandbytes layer
    repacks its weight in place (the bug class), on the generic path it does not; pin_4bit_layout stops it."""
    model = load(base_dir, "nf4").eval()
    layer = model.model.layers[0].self_attn.q_proj
    packed_before = layer.weight.data.clone()
    x = torch.randn(2, 64)
    with torch.no_grad():
        layer(x)
    repacked = getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert repacked == (bnb_cpu_path == "avx512_bf16")
    with pytest.raises(RuntimeError, match="repacked in place") if repacked else contextlib.nullcontext():
        check_4bit_layout(model)

    fresh = load(base_dir, "nf4").eval()
    pin_4bit_layout(fresh)
    pinned = fresh.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        pinned(x)
    assert not getattr(pinned.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(pinned.weight.data, packed_before)


def test_inject_refuses_a_weight_repacked_before_it(base_dir, bnb_cpu_path):
    """A model that ran an eval forward before sora_ds saw it: on the AVX512-BF16 path its 4-bit weights are already
    repacked (scales rounded to bf16, not reversible exactly), so inject refuses it with the fix; on the generic path
    nothing was repacked and inject goes ahead."""
    model = load(base_dir, "nf4").eval()
    with torch.no_grad():
        model(input_ids=torch.randint(0, 96, (2, 12)))
    config = sora_ds.SoRAConfig(r=4, target_modules=["q_proj"], init_seed=0)
    if bnb_cpu_path == "avx512_bf16":
        with pytest.raises(RuntimeError, match="Reload the model"):
            sora_ds.inject(model, config)
    else:
        assert sora_ds.inject(model, config)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_sora_trains_on_quantized_base(base_dir, kind, bnb_cpu_path):
    model = load(base_dir, kind)
    assert quantized_kind(model.model.layers[0].self_attn.q_proj) == ("8bit" if kind == "int8" else "4bit")
    packed_before = model.model.layers[0].self_attn.q_proj.weight.data.clone()
    losses, grads, _ = train_sora(model, eval_at=(5, 12))
    assert losses[-1] < 0.8 * losses[0], losses
    # Gradients reach only A, B and the gate; the quantized base stays frozen and untouched.
    assert grads and all(n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "gate") for n in grads), sorted(grads)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.base_layer.weight.data, packed_before)
    report = sora_ds.rank_report(model)
    kept = sum(r["kept"] for r in report.values())
    assert 0 < kept < sum(r["initial"] for r in report.values())  # some gates reached exactly zero
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == torch.float32  # compute dtype, not the packed storage dtype


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_eval_between_steps_leaves_training_unchanged(base_dir, kind, bnb_cpu_path):
    """train -> eval -> train gives exactly the losses of train -> train, on either CPU path."""
    plain, _, _ = train_sora(load(base_dir, kind), steps=8)
    with_evals, _, _ = train_sora(load(base_dir, kind), steps=8, eval_at=(0, 3, 4, 7))
    assert with_evals == plain


def trained_nf4(base_dir):
    """An nf4 model after SoRA training with an eval at step 10, its inputs and its eval-mode logits."""
    model = load(base_dir, "nf4")
    _, _, ids = train_sora(model, eval_at=(10,))
    model.eval()
    with torch.no_grad():
        return model, ids, model(input_ids=ids).logits


def test_export_from_4bit_applies_to_quantized_and_full_bases(base_dir, tmp_path, bnb_cpu_path):
    model, ids, ref = trained_nf4(base_dir)
    sora_ds.export_peft(model, tmp_path / "adapter")

    # Pinned as sora_ds pins its own models: unpinned, an eval on the AVX512-BF16 path takes bitsandbytes' bf16-only
    # kernel, which exists only on such CPUs (forced here on another CPU, it would read the repacked bytes wrongly).
    quantized = PeftModel.from_pretrained(pinned(load(base_dir, "nf4")), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert (quantized(input_ids=ids).logits - ref).abs().max().item() <= 1e-4

    # The same adapter on the unquantized base adds exactly the trained delta to the full-precision weights.
    full = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    w_before = full.model.layers[1].mlp.down_proj.weight.detach().clone()
    merged = PeftModel.from_pretrained(full, tmp_path / "adapter").merge_and_unload()
    delta = model.model.layers[1].mlp.down_proj.delta_weight().detach()
    torch.testing.assert_close(merged.model.layers[1].mlp.down_proj.weight - w_before, delta, atol=1e-6, rtol=1e-5)


def test_merge_into_4bit_base_dequantizes_and_says_so(base_dir, tmp_path, bnb_cpu_path):
    model, ids, ref = trained_nf4(base_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sora_ds.save_merged(model, tmp_path / "merged")
    assert any("dequantized" in str(w.message) for w in caught)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert not any(quantized_kind(m) for m in reloaded.modules())
    with torch.no_grad():
        assert (reloaded(input_ids=ids).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_widths_not_multiple_of_32_train_eval_export_and_merge(odd_base_dir, kind, bnb_cpu_path, tmp_path):
    """hidden 40, intermediate 100: the shapes bitsandbytes' AVX512-BF16 eval kernel refuses are handled (sora_ds
    never takes that kernel), through training with evals, export and merge."""
    model = load(odd_base_dir, kind)
    sora_ds.inject(model, sora_ds.SoRAConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_seed=0))
    opt = sora_ds.build_optimizer(model, learning_rate=1e-2, sparse_lambda=0.0)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(2))
    model.train()
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        eval_logits(model, ids)
    ref = eval_logits(model, ids)
    sora_ds.export_peft(model, tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(pinned(load(odd_base_dir, kind)), tmp_path / "adapter")
    assert (eval_logits(reloaded, ids) - ref).abs().max().item() <= 1e-4
    down = model.model.layers[1].mlp.down_proj
    expected = (dequantized_weight(down.base_layer) + down.delta_weight()).detach()
    with pytest.warns(UserWarning, match="dequantized"):
        sora_ds.merge_adapters(model)
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight.detach(), expected, atol=1e-6, rtol=1e-6)
    if kind == "nf4":  # LLM.int8 also quantizes the activations, so only a 4-bit base computes what the merge holds
        assert (eval_logits(model, ids) - ref).abs().max().item() <= 1e-4


def ds_accelerator(stage, offload=None):
    zero = {"stage": stage}
    if offload:
        zero["offload_param"] = {"device": offload}
    return types.SimpleNamespace(state=types.SimpleNamespace(
        deepspeed_plugin=types.SimpleNamespace(deepspeed_config={"zero_optimization": zero})))


@pytest.mark.parametrize(
    "quantization, stage, offload, match",
    [
        ({"load_in_8bit": True}, 3, None, "load_in_8bit cannot be sharded by ZeRO-3"),
        ({"load_in_4bit": True}, 3, None, "bnb_4bit_quant_storage must be bfloat16 for 4-bit under ZeRO-3"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "float32"}, 3, None, "bnb_4bit_quant_storage must be bfloat16 for 4-bit under ZeRO-3"),
        ({"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, 3, "cpu", "offload"),
    ],
)
def test_incompatible_quantization_with_deepspeed_is_refused(quantization, stage, offload, match):
    cfg = TrainConfig(quantization=quantization, torch_dtype="bfloat16")
    with pytest.raises(ConfigError, match=match):
        check_quantization(cfg, ds_accelerator(stage, offload))


def test_compatible_quantization_with_deepspeed_is_accepted():
    ok = TrainConfig(quantization={"load_in_4bit": True, "bnb_4bit_quant_storage": "bfloat16"}, torch_dtype="bfloat16")
    check_quantization(ok, ds_accelerator(3))
    check_quantization(TrainConfig(quantization={"load_in_8bit": True}), ds_accelerator(2))


@pytest.mark.parametrize(
    "quantization, match",
    [
        ({"load_in_4bit": True, "bnb_4bit_quant_typo": "nf4"}, "bnb_4bit_quant_typo"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "exactly one of load_in_4bit / load_in_8bit"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "int3"}, "bnb_4bit_quant_type='int3'"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float8"}, "bnb_4bit_compute_dtype='float8'"),
    ],
)
def test_quantization_config_errors_name_the_key(quantization, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(quantization=quantization)


def test_bf16_compute_keeps_fp32_adapters_that_learn(base_dir):
    """With bf16 compute (the usual GPU setup) adapters stay fp32: a 1e-4 update of a gate at 1.0 is not lost."""
    q = dict(QUANT["nf4"], bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(**q),
                                                 device_map="cpu", dtype=torch.bfloat16)
    sora_ds.inject(model, sora_ds.SoRAConfig(r=4, target_modules=["q_proj"], gate_init="ones", init_seed=0))
    layer = model.model.layers[0].self_attn.q_proj
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.gate.dtype == torch.float32
    opt = sora_ds.build_optimizer(model, learning_rate=1e-4, sparse_lambda=0.0)
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # B starts at zero, so the gate gets a gradient from the second step on
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert (layer.gate.detach() != 1.0).all()


def test_merge_in_bf16_4bit_model_keeps_dtype_and_runs(base_dir):
    model = AutoModelForCausalLM.from_pretrained(
        base_dir, quantization_config=BitsAndBytesConfig(**dict(QUANT["nf4"], bnb_4bit_compute_dtype=torch.bfloat16)),
        device_map="cpu", dtype=torch.bfloat16)
    sora_ds.inject(model, sora_ds.SoRAConfig(r=4, target_modules=["q_proj"], init_seed=0))
    with pytest.warns(UserWarning, match="dequantized"):
        sora_ds.merge_adapters(model)
    merged = model.model.layers[0].self_attn.q_proj
    assert type(merged) is torch.nn.Linear and merged.weight.dtype == torch.bfloat16
    ids = torch.randint(0, 96, (1, 8))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


class Crash(Exception):
    pass


def test_4bit_recipe_resume_with_mid_run_evals_is_exact(tmp_path, bnb_cpu_path):
    """The recipe on a 4-bit base with an eval every 2 steps, crashed after its step-4 checkpoint and resumed, logs
    exactly the losses and evals of the uninterrupted run, on either CPU path."""
    import json

    from sora_ds.recipe.train import train
    from sora_ds.recipe.config import load_config

    args = ["--config", str(REPO / "recipes" / "llama" / "tiny_sora_qlora_cpu.yaml"), "--max_steps", "6",
            "--log_every", "1", "--eval_every", "2", "--save_every", "4", "--per_device_train_batch_size", "8"]

    def records(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    def crash_at_5(step, model, optimizer):
        if step == 5:
            raise Crash

    train(load_config([*args, "--output_dir", str(tmp_path / "full")], SORA_DEMO))
    with pytest.raises(Crash):
        train(load_config([*args, "--output_dir", str(tmp_path / "part")], SORA_DEMO), on_step=crash_at_5)
    train(load_config([*args, "--output_dir", str(tmp_path / "part"), "--resume_from", "latest"], SORA_DEMO))
    full, resumed = records(tmp_path / "full"), records(tmp_path / "part")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    assert [r.get("eval_loss") is not None for r in full] == [False, True, False, True, False, True]
    for a, b in zip(full, resumed):
        assert a.keys() == b.keys()
        for key in ("loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-6 * abs(a[key]), (a["step"], key, a[key], b[key])
