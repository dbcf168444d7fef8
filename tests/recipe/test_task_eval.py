"""Evaluation that measures the task: answer-only accuracy, exact match of generated answers, candidate scoring,
``eval_dataset``, ``sora-ds eval``, and the same figures on 2 ZeRO-3 ranks as on one process.

Most checks use a hand-built model whose answer is known without running it: it answers "A" to any prompt and closes
the turn after "A" or "B". Its expected scores follow from the data alone (see :func:`constant_answer_model`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sora_ds import SoRAConfig, export_peft, inject
from sora_ds.adapters.errors import ConfigError
from sora_ds.data.answers import AnswerTokens, answer_span, normalize
from sora_ds.data.chat import tokenize_chat
from sora_ds.data.tokenizer import build_byte_tokenizer
from sora_ds.recipe import cli
from sora_ds.recipe.config import load_config
from sora_ds.recipe.train import train
from tests.support import REPO, free_port, metrics

pytestmark = pytest.mark.recipe


def constant_answer_model():
    """A 1-layer Llama on the byte tokenizer that always answers "A": attention and MLP write nothing (o_proj and
    down_proj are zero), so the last hidden state is the current token's embedding; every embedding is e0 except
    those of "A" and "B" (e1) and "C" (e2), and the head maps e0 to "A", e1 to the end-of-turn token and e2 to "C"."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_byte_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                         tie_word_embeddings=False))
    a, b, c, end = tok.convert_tokens_to_ids(["A", "B", "C", "<|end|>"])
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 0] = 1
        emb[[a, b]] = 0
        emb[[a, b], 1] = 1
        emb[c] = 0
        emb[c, 2] = 1
        head.zero_()
        head[a, 0] = head[end, 1] = head[c, 2] = 10
    return model, tok


def write_chat(path: Path, answers: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": f"review {i}: great?", "response": a}) + "\n"
                            for i, a in enumerate(answers)))
    return path


@pytest.fixture(scope="module")
def constant(tmp_path_factory):
    """The constant-answer base (a model folder) and an untrained SoRA adapter on it (B = 0: the base's answers)."""
    root = tmp_path_factory.mktemp("constant")
    model, tok = constant_answer_model()
    model.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    inject(model, SoRAConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_seed=0))
    export_peft(model, root / "adapter", str(root / "base"), tok)
    return root


def test_answer_span_is_the_final_answer_without_end_of_turn():
    tok = build_byte_tokenizer()
    messages = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "no"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "yes \n"}]
    row = tokenize_chat(messages, tok, 64)
    start, end, turn_end = answer_span(row["input_ids"], row["labels"], AnswerTokens(tok))
    assert tok.decode(row["input_ids"][start:end]) == "yes"  # not the first answer, not " \n<|end|>"
    assert tok.decode(row["input_ids"][end:turn_end]) == " \n<|end|>"
    assert normalize("  Yes\n") == normalize("yes") != normalize("yes!")


def test_majority_answer_scores_its_share_with_sora_ds_eval(constant, tmp_path, capsys):
    """The issue's trap: a model that always gives the majority label. Token accuracy counts the end-of-turn token it
    always gets right (0.8 here); the answer-only figures give the label's share, 0.6."""
    data = write_chat(tmp_path / "test.jsonl", ["B", "A", "A", "B", "A", "A", "B", "A", "A", "B"])
    out = tmp_path / "eval"
    code = cli.main(["eval", str(constant / "adapter"), "--dataset", str(data), "--eval_max_new_tokens", "3",
                     "--eval_choices", "[A, B]", "--eval_samples", "2", "--per_device_train_batch_size", "4",
                     "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    result = json.loads((out / "eval.json").read_text())
    assert result["eval_token_accuracy"] == pytest.approx((6 * 2 + 4 * 1) / 20)
    for key in ("eval_answer_accuracy", "eval_exact_match", "eval_choice_accuracy"):
        assert result[key] == pytest.approx(0.6), key
    assert result["data"]["eval"]["examples"] == 10
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [(s["index"], s["reference"], s["generated"], s["exact_match"], s["choice"]) for s in samples] == [
        (0, "B", "A", False, "A"), (1, "A", "A", True, "A")]
    assert "eval_answer_accuracy: 0.6000" in printed


def test_recipe_eval_dataset_exact_match_after_normalisation(constant, tmp_path):
    """The recipe on one process with eval_dataset: generated "A" matches " a" and "A\\n" (case and spaces), not "b"
    or "B "; the figures reach metrics.jsonl, summary.json and eval_samples.jsonl. Training cannot change the answers:
    o_proj is zero, so the q/v adapters reach no output."""
    train_file = write_chat(tmp_path / "train.jsonl", ["A", "B"] * 4)
    test_file = write_chat(tmp_path / "test.jsonl", [" a", "A", "b", "B ", "A\n"])
    out = tmp_path / "run"
    cfg = load_config(["--model_name_or_path", str(constant / "base"), "--dataset", str(train_file),
                       "--eval_dataset", str(test_file), "--target_modules", "[q_proj, v_proj]", "--r", "2",
                       "--max_steps", "2", "--eval_every", "1", "--log_every", "1", "--per_device_train_batch_size", "4",
                       "--eval_max_new_tokens", "4", "--eval_choices", "[A, B]", "--output_dir", str(out)])
    _, summary = train(cfg)
    assert summary["data"]["train"]["examples"] == 8 and summary["data"]["eval_records"] == 5  # no split drawn
    expected = {"exact_match": 3 / 5, "choice_accuracy": 3 / 5,
                "answer_accuracy": 2 / 6,  # " a" 0/2, "A" 1/1, "b" 0/1, "B" 0/1 (its space trails), "A" 1/1
                "token_accuracy": 3 / 13}  # + end-of-turn tokens: right only after "A"
    for key, value in expected.items():
        assert summary[f"final_eval_{key}"] == pytest.approx(value), key
        assert [r[f"eval_{key}"] for r in metrics(out)] == pytest.approx([value, value]), key
    samples = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["generated"], s["exact_match"]) for s in samples] == [
        (1, "A", True), (1, "A", True), (1, "A", False), (2, "A", True), (2, "A", True), (2, "A", False)]


@pytest.mark.parametrize("args, key", [
    (["--eval_dataset", "missing.jsonl"], "eval_dataset"),
    (["--eval_dataset", "README.md"], "eval_dataset"),
    (["--eval_dataset", "sora_ds/data/assets/tiny_chat.jsonl", "--eval_size", "0.2"], "eval_size"),
    (["--eval_max_new_tokens", "-1"], "eval_max_new_tokens"),
    (["--eval_samples", "-2"], "eval_samples"),
    (["--eval_choices", "[A]"], "eval_choices"),
    (["--eval_choices", "[A, ' a']"], "eval_choices"),  # the same after normalisation
    (["--eval_choices", "A"], "eval_choices"),  # not a list
    (["--eval_choices", "[yes, no]"], "eval_choices"),  # YAML's booleans (the error says to quote them)
    (["--eval_size", "0", "--eval_max_new_tokens", "4"], "eval_max_new_tokens"),  # nothing to evaluate on
])
def test_bad_eval_keys_are_refused(args, key, monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as e:
        load_config(args)
    assert e.value.key == key


def test_sora_ds_eval_refuses_before_loading(constant, tmp_path, capsys):
    data = write_chat(tmp_path / "test.jsonl", ["A", "B", "C"])
    adapter = str(constant / "adapter")
    assert cli.main(["eval", adapter, "--dataset", str(data), "--eval_choices", "[A, B]"]) == 2
    assert "eval example 3: its answer 'C' is none of eval_choices ['A', 'B']" in capsys.readouterr().err
    assert cli.main(["eval", adapter, "--dataset", str(data), "--learning_rate", "1"]) == 2
    assert "learning_rate is not an evaluation setting" in capsys.readouterr().err


# The distributed check's template: the prompt is the user's text itself (no generation prompt), so the model's first
# answer token depends on the prompt's last character: "x" -> "A" then end of turn; "B" -> end of turn at once; "C" ->
# "C" until max_new_tokens. Prompts that stop after 1, 2 and 6 decoding steps share the ranks' batches.
STEERED_TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}<|end|>{% endif %}"
                    "{% endfor %}")
STEERED = [("x", "A"), ("x", "B"), ("B", "A"), ("x", "A"), ("C", "A"), ("x", "A"), ("B", "B"), ("x", "B"), ("x", "A"),
           ("x", "B")]


@pytest.mark.distributed
def test_zero3_two_ranks_give_the_eval_metrics_of_one_process(constant, tmp_path):
    """One 2-rank ZeRO-3 launch (base and adapter sharded) against one process, both against the figures the
    constant model must give. 10 eval examples in batches of 4: rank 0 takes batches 0 and 2, rank 1 batch 1 and a
    stand-in (batch 0 again). Generation stops after 1, 2 or 6 steps depending on the prompt: rank 1's batch decodes
    6 steps, rank 0's at most 2, so without synced_gpus the ranks would make different numbers of forward calls and
    ZeRO-3's weight gathers would hang."""
    (tmp_path / "template.jinja").write_text(STEERED_TEMPLATE)
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"prompt": f"q{i} {end}", "response": answer}) + "\n"
                                                 for i, (end, answer) in enumerate(STEERED)))
    write_chat(tmp_path / "train.jsonl", ["A", "B"] * 4)
    common = ["--model_name_or_path", str(constant / "base"), "--chat_template", str(tmp_path / "template.jinja"),
              "--dataset", str(tmp_path / "train.jsonl"), "--eval_dataset", str(tmp_path / "test.jsonl"),
              "--target_modules", "[q_proj, v_proj]", "--r", "2", "--max_steps", "2", "--log_every", "1",
              "--eval_every", "1", "--per_device_train_batch_size", "4", "--eval_max_new_tokens", "6",
              "--eval_choices", "[A, B]", "--eval_samples", "10"]
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    proc = subprocess.Popen([accelerate, "launch", "--config_file", "launch/accelerate/zero3.yaml",
                             "--deepspeed_config_file", "tests/fixtures/zero3_sharded.json", "--num_processes", "2",
                             "--main_process_port", str(free_port()), "recipes/llama_sora.py", *common,
                             "--output_dir", str(zero3)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:  # the single process runs meanwhile (accumulation 2: the same 8 examples per step as 2 ranks x 4)
        train(load_config([*common, "--gradient_accumulation_steps", "2", "--output_dir", str(single)]))
        log, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, log[-4000:]
    one, two = (json.loads((run / "summary.json").read_text()) for run in (single, zero3))
    assert (two["zero_stage"], two["num_processes"]) == (3, 2)
    assert 0.4 < two["adapter_elements_on_rank"] / two["adapter_elements"] < 0.6  # really sharded
    assert two["base_bytes_on_rank"] < 0.6 * two["base_bytes"]
    # "x" prompts answer "A" (4 of them right); "B" and "C" prompts tie A and B (zero logits): the first, A, is picked
    expected = {"exact_match": 4 / 10, "answer_accuracy": 4 / 10, "token_accuracy": (4 + 10) / 20,
                "choice_accuracy": 6 / 10}
    for key, value in expected.items():
        assert one[f"final_eval_{key}"] == two[f"final_eval_{key}"] == pytest.approx(value), key
        assert [r[f"eval_{key}"] for r in metrics(zero3)] == [r[f"eval_{key}"] for r in metrics(single)], key
    assert two["final_eval_loss"] == pytest.approx(one["final_eval_loss"], rel=1e-5)
    samples = [[json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
               for run in (single, zero3)]
    assert samples[1] == samples[0]
    assert [s["generated"] for s in samples[1] if s["step"] == 2] == ["A", "A", "", "A", "CCCCCC", "A", "", "A", "A",
                                                                      "A"]
