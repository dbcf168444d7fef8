"""The recipe scripts as a user first meets them: --help lists every key from the config; mistakes are one line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from sora_ds.adapters.schedule import LambdaSchedule
from sora_ds.recipe.config import SoRAConfig, TrainConfig
from sora_ds.recipe.usage import field_help, recipe_usage
from tests.support import REPO, SORA_DEMO

pytestmark = pytest.mark.unit

ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}


def script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "recipes/llama_sora.py", *args], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=120, check=False)


def test_help_lists_every_key_with_its_default_and_help():
    proc = script("--help")
    assert proc.returncode == 0, proc.stderr
    for cls, skip in ((TrainConfig, {"adapter", "sparsity"}), (SoRAConfig, {"init_seed"}), (LambdaSchedule, set())):
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                assert f"\n  --{f.name} " in proc.stdout, f.name
    assert "--learning_rate 0.01*" in proc.stdout  # the demo YAML's value, marked
    assert "AdamW learning rate of the adapter" in proc.stdout  # the field's own comment
    assert "--target_r" not in proc.stdout  # the other method's keys: with --method adalora --help
    assert "--target_r 8 " in recipe_usage("x.py", SORA_DEMO, "adalora")


def test_every_recipe_key_has_one_line_of_help():
    helps = {**field_help(TrainConfig), **field_help(SoRAConfig), **field_help(LambdaSchedule)}
    missing = [f.name for cls in (TrainConfig, SoRAConfig, LambdaSchedule) for f in dataclasses.fields(cls)
               if f.name not in {"adapter", "sparsity", "init_seed"} and not helps.get(f.name)]
    assert missing == []


def test_a_config_mistake_is_one_line_and_debug_shows_the_traceback():
    proc = script("--r", "0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "sora-ds: error: r must be a positive integer, got 0 (--debug shows the traceback)"]
    proc = script("--r", "0", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "ConfigError: r must be" in proc.stderr
