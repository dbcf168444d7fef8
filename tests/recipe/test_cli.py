"""The `sora-ds` command on a real (tiny) run: export from a checkpoint, merge, report, and its errors."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from sora_ds.recipe.cli import main
from sora_ds.recipe.train import train
from sora_ds.recipe.config import load_config
from tests.support import SORA_DEMO

pytestmark = pytest.mark.recipe



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train(load_config(["--max_steps", "6", "--save_every", "3", "--log_every", "3", "--sparsify_stages", "2",
                       "--export_formats", "[peft, vllm]", "--output_dir", str(out)], SORA_DEMO))
    return out


def test_export_from_checkpoint_and_from_run(run_dir, tmp_path, capsys):
    ckpt = run_dir / "checkpoints" / "checkpoint-3"
    assert main(["export", str(ckpt), str(tmp_path / "a")]) == 0
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (ckpt / "adapter" / f).read_bytes()
    assert main(["export", str(run_dir), str(tmp_path / "b")]) == 0  # the run's final adapter
    assert (tmp_path / "b" / "adapter_model.safetensors").read_bytes() == \
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()


def test_export_errors_say_what_is_expected(tmp_path, capsys):
    assert main(["export", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "no PEFT adapter found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_merge_equals_the_adapter_on_its_base(run_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert main(["merge", "--base", str(run_dir / "base_model"), "--adapter", str(run_dir), str(tmp_path / "m")]) == 0
    ids = torch.randint(7, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(input_ids=ids).logits
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run_dir / "base_model"),
                                         run_dir / "adapter").eval()(input_ids=ids).logits
    assert (merged - peft).abs().max().item() <= 1e-4
    assert (tmp_path / "m" / "tokenizer_config.json").is_file()


def test_report_prints_ranks_and_stages_and_draws_heatmap(run_dir, capsys):
    (run_dir / "rank_heatmap.png").unlink()
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"total kept ranks: {summary['total_kept_ranks']}/{summary['total_initial_ranks']}" in out
    assert "stage 1 (step 6" in out
    assert (run_dir / "rank_heatmap.png").is_file()
    assert f"vLLM max_lora_rank {summary['serving']['vllm_max_lora_rank']}" in out and "adapter_vllm/ (vllm" in out


def test_run_writes_serving_formats_and_costs(run_dir):
    """export_formats: [peft, vllm] -> adapter/ and adapter_vllm/, each with its engines; summary.json's serving."""
    serving = json.loads((run_dir / "summary.json").read_text())["serving"]
    assert set(serving["formats"]) == {"adapter", "adapter_vllm"}
    for folder, record in serving["formats"].items():
        assert json.loads((run_dir / folder / "serving.json").read_text()) == record
    assert all(v.startswith("loads") for v in serving["formats"]["adapter_vllm"]["engines"].values())
    assert serving["formats"]["adapter_vllm"]["r"] == serving["vllm_max_lora_rank"]
    flops = serving["flops_per_token"]
    assert flops["kept"] <= flops["unpruned"] and flops["padded"] >= flops["kept"]
    assert serving["adapter_bytes"]["kept"] == 2 * flops["kept"]  # float32: 4 bytes, 2 FLOPs per parameter


def test_export_formats_on_the_command_line(run_dir, tmp_path, capsys):
    assert main(["export", str(run_dir), str(tmp_path / "u"), "--format", "uniform"]) == 0
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "u" / "serving.json").read_text())
    assert record["format"] == "uniform" and all(v.startswith("loads") for v in record["engines"].values())
    assert "sglang" in out and "max_lora_rank" in out
    assert main(["export", str(run_dir), str(tmp_path / "m"), "--format", "merged"]) == 2
    assert "sora-ds merge --base" in capsys.readouterr().err and not (tmp_path / "m").exists()
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    help_text = capsys.readouterr().out
    for fmt in ("peft", "uniform", "vllm", "merged"):
        assert f"\n  {fmt} " in help_text


def test_console_script_is_installed():
    exe = shutil.which("sora-ds")
    assert exe, "the sora-ds console script is not on PATH (pip install -e . registers it)"
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "export" in proc.stdout and "merge" in proc.stdout


def test_generate_answers_from_the_export_like_the_compact_adapter(run_dir, tmp_path, capsys):
    """`sora-ds generate` on the vLLM-format folder gives the greedy reply of the compact adapter, cut at the chat
    template's end-of-turn token; a base that is not there is one line naming it."""
    from sora_ds.recipe.generate import load_with_adapter, reply, stop_ids

    assert main(["generate", str(run_dir / "adapter_vllm"), "--prompt", "repeat: owl", "--max_new_tokens", "12"]) == 0
    said = capsys.readouterr().out.strip()
    model, tokenizer = load_with_adapter(run_dir / "adapter")
    assert said == reply(model, tokenizer, "repeat: owl", 12).strip()
    assert stop_ids(tokenizer) == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")})
    assert main(["generate", str(run_dir), "--prompt", "x", "--base", str(tmp_path / "gone")]) == 2
    assert f"--base is '{tmp_path / 'gone'}': no such folder" in capsys.readouterr().err
