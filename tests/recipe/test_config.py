"""The recipe config: YAML and overrides, errors that name the recipe key, one definition per knob, round trips."""

from __future__ import annotations

import pytest
import yaml

from sora_ds.recipe.config import ConfigError, TrainConfig, load_config, save_config
from tests.support import ADALORA_DEMO, SORA_DEMO

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--learning_rat", "1e-3"], r"learning_rat \(from command line\) is not a config key.*'learning_rate'"),
        (["--r", "eight"], r"^r \(from command line\) got 'eight' of type str; expected int"),
        (["--target_r", "4"], r"target_r \(from command line\) belongs to AdaLoRAConfig; with method: sora leave it out"),
        (["--init_seed", "4"], r"init_seed .* is set by the recipe from seed; set seed instead"),
        (["--r", "0"], r"^r must be a positive integer, got 0$"),
        (["--threshold_mode", "relative"], "threshold_mode='relative'.*lr_scaled"),
        (["--lambda_schedule", "cosine"], r"^lambda_schedule must be one of \['constant', 'linear', 'loglinear', 'exp'\], got 'cosine'$"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--lambda_ramp_steps", "5", "--lambda_schedule", "linear", "--sparsify_stages", "8"],
         r"^sparsify_stages=8 exceeds lambda_ramp_steps=5$"),
        (["--config", "does/not/exist.yaml"], "no such file"),
        (["--lambda_schedule", "loglinear", "--lambda_start", "0"], r"^lambda_start must be > 0 for lambda_schedule='loglinear', got 0.0$"),
        (["--target_modules", "[]"], "target_modules"),
        (["stray"], r"^argument 'stray' is unexpected; use --config FILE.yaml and --key value overrides$"),
        (["--max_grad_norm", "-1"], r"^max_grad_norm must be >= 0, got -1.0$"),
        (["--output_dir", ""], r"^output_dir is empty; give the folder the run writes to"),
        (["--target_modules", "'(q|v_proj'"], r"^target_modules '\(q\|v_proj' is not a valid regular expression: "
                                                r"missing \), unterminated subpattern"),
        (["--dist_timeout", "0"], r"^dist_timeout must be >= 1 second"),
        (["--keep_fraction", "0.5"], r"^lambda_schedule='constant' gives keep_fraction no ramp to follow"),
        (["--keep_fraction", "1.2", "--lambda_schedule", "linear"], r"^keep_fraction must be in \(0, 1\]"),
        (["--keep_fraction", "0.5", "--lambda_schedule", "linear", "--sparsify_stages", "4"],
         r"^sparsify_stages steps lambda through fixed levels"),
        (["--truncation", "keep_end"], r"^truncation='keep_end' is not allowed; choose one of \['keep_answer', 'keep_start'\]$"),
        (["--chat_template", "nope.jinja"], r"^chat_template='nope.jinja' is neither a Jinja template .* nor an existing "
                                            r"file; give the template itself or the path of a .jinja file$"),
        (["--resume_allow_changes", "[seed]"], r"^resume_allow_changes entries \['seed'\] cannot be allowed; allowed: "
                                               r"\['dataset', 'max_steps', 'model_name_or_path', 'tokenizer_name_or_path'\]"),
    ],
)
def test_config_errors_name_the_key(argv, match):
    with pytest.raises(ConfigError, match=match):
        load_config(argv, SORA_DEMO)


def test_chat_template_replaces_the_tokenizers_own(tmp_path):
    from sora_ds.recipe.model import load_tokenizer

    inline = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"chat_template": inline}))
    for argv in (["--config", str(config)], ["--chat_template", inline], ["--chat_template", str(path)]):
        tok = load_tokenizer(load_config(argv, SORA_DEMO))
        assert tok.apply_chat_template(chat, tokenize=False) == "[user] hi\n[assistant] yo\n"
    assert load_tokenizer(load_config([], SORA_DEMO)).apply_chat_template(chat, tokenize=False).startswith("<s><|user|>")


def test_eval_size_is_a_fraction_or_a_count():
    assert load_config(["--eval_size", "10"], SORA_DEMO).eval_size == 10
    assert isinstance(load_config(["--eval_size", "10"], SORA_DEMO).eval_size, int)
    assert load_config(["--eval_size", "0.25"], SORA_DEMO).eval_size == 0.25


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("r: 4\nlearning_rate: [1e-3\n")
    with pytest.raises(ConfigError, match=rf"^--config '{path}' is not valid YAML at line 3, column 1: expected ',' or '\]', but got '<stream end>'$"):
        load_config(["--config", str(path)], SORA_DEMO)


def test_yaml_config_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("r: 4\nsparse_lambda: 0.5\nlearning_rate: 1e-3\n")
    cfg = load_config(["--config", str(path), "--r", "2"], SORA_DEMO)
    assert (cfg.adapter.r, cfg.sparsity.sparse_lambda, cfg.learning_rate) == (2, 0.5, 1e-3)
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]  # the SoRAConfig default: the YAML is the whole config
    (tmp_path / "bad.yaml").write_text("r: 4\nbogus_key: 1\n")
    with pytest.raises(ConfigError, match="bogus_key"):
        load_config(["--config", str(tmp_path / "bad.yaml")], SORA_DEMO)


@pytest.mark.parametrize(
    "report_to, match",
    [("[tensorboardx]", r"report_to entry 'tensorboardx' is not a tracker"),
     ("[swanlab]", r"report_to entry 'swanlab': its package is not installed \(pip install swanlab\)")],
)
def test_unknown_or_missing_tracker_is_refused(report_to, match):
    with pytest.raises(ConfigError, match=match):
        load_config(["--report_to", report_to], SORA_DEMO)


def test_every_library_field_is_a_recipe_key_with_one_owner():
    """The adapter and schedule keys come from the library's dataclasses (one definition per knob): each of their
    fields is a recipe key owned by that dataclass, and none collides with a recipe field."""
    from dataclasses import fields

    from sora_ds import LambdaSchedule
    from sora_ds.recipe.config import ADAPTER_CONFIGS, DERIVED, OWN_KEYS, key_owner

    for method, cls in ADAPTER_CONFIGS.items():
        owners = [cls] + ([LambdaSchedule] if method == "sora" else [])
        for owner in owners:
            names = {f.name for f in fields(owner)} - set(DERIVED)
            assert not names & OWN_KEYS
            assert {key_owner(k, method) for k in names} == {owner}


@pytest.mark.parametrize("demo", [SORA_DEMO, ADALORA_DEMO], ids=["sora", "adalora"])
def test_saved_config_loads_back_equal(demo, tmp_path):
    cfg = load_config(["--r", "16", "--seed", "7", "--max_steps", "150"], demo)
    assert cfg.adapter.init_seed == 7 and (cfg.method == "sora" or cfg.adapter.total_step == 150)
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(["--config", str(tmp_path / "config.yaml")]) == cfg


@pytest.mark.parametrize("formats, words", [
    (["vllm"], "must include 'peft'"), (["peft", "merged"], "save_merged"), (["peft", "gguf"], "'uniform'"),
    (["peft", "peft"], "twice"), ("peft", "list of format names"),
])
def test_export_formats_errors_name_the_allowed_values(formats, words):
    with pytest.raises(ConfigError, match="export_formats") as e:
        TrainConfig(export_formats=formats)
    assert words in str(e.value)


def test_keep_fraction_is_a_sora_key():
    """AdaLoRA's budget already is a target (target_r): keep_fraction is refused, and says so."""
    with pytest.raises(ConfigError, match=r"^keep_fraction \(from command line\) is a SoRA key .*target_r"):
        load_config(["--keep_fraction", "0.5"], ADALORA_DEMO)
    cfg = load_config(["--keep_fraction", "0.5", "--lambda_schedule", "linear", "--max_steps", "40"], SORA_DEMO)
    assert (cfg.sparsity.keep_fraction, cfg.sparsity.lambda_ramp_steps, cfg.to_dict()["keep_fraction"]) == (0.5, 40, 0.5)
