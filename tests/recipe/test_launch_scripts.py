"""The launch scripts as users run them before they have an allocation."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support import REPO

pytestmark = pytest.mark.unit


def test_slurm_dry_run_works_outside_an_allocation():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "--dry-run", "--gpus-per-node", "4", "--", "--config",
                           "my_run.yaml"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "dry run outside a SLURM job" in proc.stderr
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith("srun --nodes 2 --ntasks-per-node 1")
    assert "--num_machines 2 --num_processes 8" in command and command.endswith("recipes/llama_sora.py --config my_run.yaml")


def test_slurm_without_dry_run_outside_an_allocation_says_how_to_submit():
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(["bash", "launch/slurm.sbatch", "--", "--config", "my_run.yaml"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "not inside a SLURM job" in proc.stderr and "--dry-run" in proc.stderr
