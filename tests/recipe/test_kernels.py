"""The GPU speed keys on CPU: what is refused without the package or a GPU (one line naming key, value and the fix),
fused AdamW keeping the proximal step, and the flattened packed layout FlashAttention needs."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sora_ds import SoRAConfig, inject
from sora_ds.adapters.errors import ConfigError
from sora_ds.adapters.inject import gate_parameters
from sora_ds.adapters.optim import build_optimizer, unwrap_optimizer
from sora_ds.data.chat import IGNORE_INDEX, collate
from sora_ds.data.packing import pack_examples
from sora_ds.recipe import train as train_module
from sora_ds.recipe.config import load_config
from sora_ds.recipe.kernels import check_kernel_environment
from sora_ds.recipe.train import train
from sora_ds.recipe.cli import main as cli_main
from tests.support import REPO, SORA_DEMO, assert_same_losses, build_llama, token_ids

NO_GPU = not torch.cuda.is_available()


@pytest.mark.unit
@pytest.mark.parametrize("args, message", [
    (["--attn_implementation", "flash"], r"^attn_implementation='flash' is not allowed; choose one of "
                                         r"\['sdpa', 'eager', 'flash_attention_2'\]"),
    (["--peak_flops_per_device", "-1"], r"^peak_flops_per_device must be > 0"),
    (["--fused_adamw", "maybe"], r"^fused_adamw .*got 'maybe' .*expected"),
    (["--torch_compile", "3"], r"^torch_compile .*got 3 .*expected bool"),
])
def test_bad_speed_keys_are_refused(args, message):
    with pytest.raises(ConfigError, match=message):
        load_config(args, SORA_DEMO)


@pytest.mark.unit
@pytest.mark.skipif(not NO_GPU, reason="the refusals of a machine without a GPU")
@pytest.mark.parametrize("key, value, package", [("attn_implementation", "flash_attention_2", "flash_attn"),
                                                 ("use_liger_kernel", "true", "liger_kernel")])
def test_gpu_kernels_are_refused_without_package_or_gpu(monkeypatch, tmp_path, key, value, package):
    """Without the package: the install command; with it but no GPU: that a GPU is needed. Both say what to do, when
    a run starts and before it writes anything; the config itself loads (preview and plan of a GPU recipe work on a
    laptop)."""
    cfg = load_config([f"--{key}", value, "--output_dir", str(tmp_path / "out")], SORA_DEMO)
    installed = importlib.util.find_spec(package) is not None
    if not installed:
        with pytest.raises(ConfigError, match=rf"^{key}=.* needs the {package} package, which is not installed \(pip "
                                              r"install .*\); (use sdpa|set use_liger_kernel: false)"):
            train(cfg)
        assert not (tmp_path / "out" / "config.yaml").exists()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == package else real(name, *a))
    with pytest.raises(ConfigError, match=rf"^{key}=.* needs a CUDA GPU .* none is available; "):
        check_kernel_environment(cfg)
    assert load_config(["--attn_implementation", "eager"], SORA_DEMO).attn_implementation == "eager"
    assert cli_main(["plan", "--config", str(REPO / "recipes/llama/8b_sora.yaml"), f"--{key}", value]) == 0


@pytest.mark.unit
def test_fused_adamw_takes_the_same_steps_and_keeps_the_proximal_step(single_thread):
    """torch's fused AdamW kernel (on CPU since torch 2.4) against the foreach one: the same adapter after steps that
    prune gates, the soft threshold applied after the update in both."""
    models = []
    for fused in (False, True):
        model = build_llama()
        inject(model, SoRAConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_seed=0))
        opt = build_optimizer(model, learning_rate=5e-2, sparse_lambda=0.2, threshold_mode="absolute", fused=fused)
        assert opt.defaults["fused"] is (True if fused else None) and opt.defaults["foreach"] is (None if fused else True)
        ids = token_ids(7, batch=4, length=10)
        for _ in range(4):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        models.append(model)
    plain, fused = ([p.detach() for p in m.parameters() if p.requires_grad] for m in models)
    for a, b in zip(plain, fused):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-5)  # another summation order
    gates = [g.detach() for g in gate_parameters(models[1])]
    zeros = sum(int((g == 0).sum()) for g in gates)
    assert 0 < zeros < sum(g.numel() for g in gates)  # pruned some, not all
    assert [(g == 0).tolist() for g in gates] == [(g.detach() == 0).tolist() for g in gate_parameters(models[0])]


@pytest.mark.recipe
def test_recipe_with_fused_adamw_matches_the_default_losses(tmp_path, single_thread):
    """fused_adamw: true on CPU reaches the optimizer and trains as the default (foreach) run does."""
    seen = []
    base = ["--max_steps", "4", "--log_every", "1", "--eval_every", "0"]
    train(load_config([*base, "--output_dir", str(tmp_path / "foreach")], SORA_DEMO))
    train(load_config([*base, "--fused_adamw", "true", "--output_dir", str(tmp_path / "fused")], SORA_DEMO),
          on_step=lambda step, model, opt: seen.append(unwrap_optimizer(opt).defaults["fused"]))
    assert seen == [True] * 4
    assert_same_losses(tmp_path / "foreach", tmp_path / "fused", tol=1e-5)


def _rows():
    rows = [{"input_ids": list(range(10 + i, 10 + i + n)), "labels": [IGNORE_INDEX] + list(range(11 + i, 10 + i + n))}
            for i, n in enumerate([9, 5, 7, 3, 6, 8])]
    return pack_examples(rows, max_length=14)


@pytest.mark.unit
def test_flattened_packed_batch_layout_and_logits(single_thread):
    """Flattened: one row, no padding, position_ids restarting per example, first label of each example masked (so
    of each row too), and the logits of the padded [rows, width] layout, which transformers' FlashAttention path
    would not treat as packed (it reads packing from position_ids only for a single row)."""
    from transformers.modeling_flash_attention_utils import _is_packed_sequence

    packed = _rows()
    padded, flat = collate(packed, pad_token_id=0), collate(packed, pad_token_id=0, flatten=True)
    total = sum(len(r["input_ids"]) for r in packed)
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    assert flat["input_ids"].shape == (1, total) and padded["input_ids"].shape[0] == len(packed) > 1
    starts = (flat["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert len(starts) == 6  # one per example, none for padding
    assert all(flat["labels"][0, s] == IGNORE_INDEX for s in starts)
    assert _is_packed_sequence(flat["position_ids"], 1)
    assert not _is_packed_sequence(padded["position_ids"], padded["input_ids"].shape[0])
    model = build_llama(vocab_size=64).eval()
    model.config.use_cache = False
    with torch.no_grad():
        together = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits[0]
        rows = model(input_ids=padded["input_ids"], position_ids=padded["position_ids"]).logits
    pieces = torch.cat([rows[i, :len(r["input_ids"])] for i, r in enumerate(packed)])
    torch.testing.assert_close(together, pieces, rtol=1e-4, atol=1e-5)


@pytest.mark.recipe
def test_packed_recipe_trains_the_same_flattened(tmp_path, monkeypatch, single_thread):
    """The recipe with its loaders flattening packed rows (as under flash_attention_2; sdpa here, which builds the
    block-diagonal mask from the flattened position_ids) takes the same losses as with padded rows."""
    base = ["--max_steps", "3", "--log_every", "1", "--eval_every", "0", "--packing", "true", "--max_length", "256",
            "--per_device_train_batch_size", "4"]
    train(load_config([*base, "--output_dir", str(tmp_path / "rows")], SORA_DEMO))
    monkeypatch.setattr(train_module, "flatten_packed", lambda cfg: True)
    shapes = []

    def recording(features, **kw):
        batch = collate(features, **kw)
        shapes.append((kw.get("flatten", False), len(features), tuple(batch["input_ids"].shape)))
        return batch

    monkeypatch.setattr(train_module, "collate", recording)
    train(load_config([*base, "--output_dir", str(tmp_path / "flat")], SORA_DEMO))
    trained = [s for s in shapes if s[0]]
    assert len(trained) >= 3 and all(n == 4 and shape[0] == 1 and shape[1] > 256 for _, n, shape in trained)
    assert_same_losses(tmp_path / "rows", tmp_path / "flat", tol=1e-4)


@pytest.mark.unit
def test_torch_compile_reaches_accelerate_or_is_refused(tmp_path):
    """torch_compile asks accelerate for inductor (compiling the tiny model on CPU takes minutes: the compiled run
    itself is a GPU test); in a process whose accelerate state was set up without it, the run refuses to start."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from sora_ds.recipe.model import build_accelerator

    cfg = load_config(["--torch_compile", "true", "--output_dir", str(tmp_path)], SORA_DEMO)
    try:
        AcceleratorState._reset_state(reset_partial_state=True)
        assert build_accelerator(cfg).state.dynamo_plugin.backend.value == "INDUCTOR"
        AcceleratorState._reset_state(reset_partial_state=True)
        Accelerator()  # an earlier run of the same process, uncompiled
        with pytest.raises(ConfigError, match=r"^torch_compile=True cannot take effect: accelerate was set up earlier"):
            build_accelerator(cfg)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
