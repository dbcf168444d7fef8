"""bench/quality_grid.py --tiny: every arm type (PEFT LoRA, SoRA at a keep_fraction and at a lambda, the sparsifying
scheduler, sora-ds AdaLoRA) through lr tuning on the validation file, seeds and the statistics, end to end; the
statistics are recomputed here from the per-seed runs. The shipped grid configs pass the recipe's validation."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest

from tests.support import REPO

pytestmark = pytest.mark.recipe

SCRIPT = REPO / "bench" / "quality_grid.py"


def _module():
    spec = importlib.util.spec_from_file_location("quality_grid", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_t_interval_matches_student_t():
    m, lo, hi = _module().t_interval([0.01, 0.03, 0.05])  # mean 0.03, sd 0.02, t(0.975, 2 df) = 4.303
    half = 4.303 * 0.02 / math.sqrt(3)
    assert (m, lo, hi) == pytest.approx((0.03, 0.03 - half, 0.03 + half))


@pytest.mark.parametrize("name", ["grid", "grid_gpu", "lora_lr_check", "sora_lr_check"])
def test_shipped_grid_configs_are_valid_recipe_configs(name, tmp_path):
    mod = _module()
    cfg = mod.read_config(str(REPO / "bench" / "quality" / f"{name}.yaml"), False)
    out = mod.main(["--config", str(REPO / "bench" / "quality" / f"{name}.yaml"), "--out", str(tmp_path), "--check"])
    # every task x its arms x its lrs x seed went through load_config
    assert out["configs"] == sum(len(tc["lrs"][arm["method"]]) * len(tc["seeds"]) for t in cfg["tasks"]
                                 for tc in [mod.task_config(cfg, t)] for arm in mod.task_arms(tc, t)) > 0


def test_a_tasks_steps_stretch_its_schedule_and_the_rest_stays():
    mod = _module()
    cfg = mod.read_config(str(REPO / "bench" / "quality" / "grid.yaml"), False)
    ar, rt = mod.task_config(cfg, "arithmetic"), mod.task_config(cfg, "rotten_tomatoes")
    assert ar["steps"] == 90 == 3 * cfg["steps"] and ar["warmup_steps"] == 3 * cfg["warmup_steps"]
    assert ar["tune_seeds"] == [0, 1] and ar["lrs"]["lora"] == [1.0e-3, 3.0e-3, 1.0e-2]
    for arm, stretched in zip(cfg["arms"], ar["arms"]):  # ramps and AdaLoRA's t_init / t_final / delta_t x 3
        assert {k: v * 3 if k in mod.SCHEDULE_STEP_KEYS else v for k, v in arm.items()} == stretched
    assert any("lambda_ramp_steps" in arm for arm in cfg["arms"])
    assert {k: v for k, v in rt.items() if k != "per_task"} == {k: v for k, v in cfg.items() if k != "per_task"}


@pytest.mark.parametrize("per_task, message", [
    ("{sst2: {steps: 90}}", r"per_task: task 'sst2' is not in the config's tasks \['rotten_tomatoes'\]"),
    ("{rotten_tomatoes: {batch_size: 8}}", r"per_task.rotten_tomatoes: unknown keys \['batch_size'\]; allowed: "),
    ("{rotten_tomatoes: {steps: 0}}", r"per_task.rotten_tomatoes.steps = 0: allowed a positive integer"),
    ("{rotten_tomatoes: {lrs: {sora: [1.0e-3]}}}", r"per_task.rotten_tomatoes.lrs: no learning rates for methods "
                                                   r"\['lora'\]"),
])
def test_bad_per_task_is_named_before_any_run(tmp_path, per_task, message):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: tiny\ntasks: [rotten_tomatoes]\nper_task: {per_task}\narms:\n"
                   "  - {name: LoRA r=2, method: lora, r: 2}\n")
    with pytest.raises(SystemExit, match=message):
        _module().main(["--config", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _grid_and(name: str, changed: tuple[str, ...]) -> tuple[dict, dict]:
    """grid.yaml and bench/quality/NAME.yaml, after asserting that they agree on every key but ``changed``."""
    mod = _module()
    grid, other = (mod.read_config(str(REPO / "bench" / "quality" / f"{n}.yaml"), False) for n in ("grid", name))
    assert {k: v for k, v in other.items() if k not in changed} == {k: v for k, v in grid.items() if k not in changed}
    return grid, other


def test_lr_check_is_the_grid_with_only_loras_lr_changed():
    grid, check = _grid_and("lora_lr_check", ("lrs", "arms", "tasks", "per_task"))
    assert check["tasks"] == ["rotten_tomatoes"] and check["per_task"] == {}  # where LoRA's tuning tied
    assert check["lrs"]["lora"] == [3.0e-3] and 3.0e-3 in grid["lrs"]["lora"] and 3.0e-3 in grid["lrs"]["sora"]
    assert [a for a in check["arms"] if a not in grid["arms"]] == []  # the same LoRA arms the grid scores


def test_sora_lr_check_is_the_grids_arithmetic_sora_arms_at_another_lr():
    grid, check = _grid_and("sora_lr_check", ("lrs", "arms", "tasks", "per_task"))
    assert check["tasks"] == ["arithmetic"] and check["per_task"]["arithmetic"]["lrs"] == {"sora": [3.0e-3]}
    assert check["per_task"]["arithmetic"]["steps"] == grid["per_task"]["arithmetic"]["steps"]
    assert 3.0e-3 in grid["per_task"]["arithmetic"]["lrs"]["sora"]
    on_arith = [a for a in grid["arms"] if a["method"] == "sora" and "arithmetic" in a.get("tasks", grid["tasks"])]
    assert check["arms"] == on_arith and len(on_arith) == 3  # every SoRA arm the grid runs on arithmetic, as it is


def test_bad_arm_is_named_before_any_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\nsteps: 30\nseeds: [0]\nlrs: {adalora: [1.0e-3]}\narms:\n"
                   "  - {name: AdaLoRA bad, method: adalora, r: 8, target_r: 4, t_init: 20, t_final: 20, delta_t: 3}\n")
    with pytest.raises(SystemExit, match="arm 'AdaLoRA bad'.*t_init=20"):
        _module().main(["--config", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_tiny_grid_runs_every_arm_and_its_statistics_come_from_the_seeds(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "quality_grid.json").read_text())
    assert res["partial"] is False
    cfg, tr = res["config"], res["tasks"]["rotten_tomatoes"]
    assert (tmp_path / "quality_grid.png").stat().st_size > 0
    md = (tmp_path / "quality_grid.md").read_text()
    assert "| SoRA r=4 scheduler |" in md and "Sparsifying scheduler, per stage end" in md

    # lr tuning: on the validation file, the method's first arm, the best mean validation accuracy wins
    assert {r["split"] for r in tr["tuning"]} == {"validation"}
    for method, lrs in cfg["lrs"].items():  # every method has an arm on rotten_tomatoes
        first = next(a["name"] for a in cfg["arms"] if a["method"] == method)
        recs = [r for r in tr["tuning"] if r["method"] == method]
        assert {r["arm"] for r in recs} == {first} and sorted({r["lr"] for r in recs}) == sorted(lrs)
        score = {lr: sum(r["accuracy"] for r in recs if r["lr"] == lr) / len(cfg["tune_seeds"]) for lr in lrs}
        assert score[tr["lr"][method]] == max(score.values())
        assert all(r["curve"] and r["curve"][0][0] == cfg["curve_every"] for r in recs)  # the validation curve

    runs = {(r["arm"], r["seed"]): r for r in tr["runs"]}
    assert len(runs) == len(cfg["arms"]) * len(cfg["seeds"])
    assert set(tr["zero_shot"]) == {"validation", "test"} and tr["metric"] == "choice_accuracy"
    stats = {s["arm"]: s for s in tr["stats"]}
    lora = {a["name"]: a for a in cfg["arms"] if a["method"] == "lora"}
    for arm in cfg["arms"]:
        per_seed = [runs[arm["name"], s] for s in cfg["seeds"]]
        assert all(r["lr"] == tr["lr"][arm["method"]] for r in per_seed)
        st = stats[arm["name"]]
        acc = [r["accuracy"] for r in per_seed]
        par = [r["params"] for r in per_seed]
        assert st["accuracy"] == acc and st["params"] == par
        for xs, m_key, s_key in ((acc, "acc_mean", "acc_std"), (par, "params_mean", "params_std")):
            m = sum(xs) / len(xs)
            assert st[m_key] == pytest.approx(m)
            assert st[s_key] == pytest.approx(math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)))
        if arm["method"] == "lora":
            assert "vs_lora" not in st
            continue
        ref = min(lora, key=lambda n: abs(math.log(stats[n]["params_mean"]) - math.log(st["params_mean"])))
        vs = st["vs_lora"]
        assert vs["ref"] == ref
        diffs = [runs[arm["name"], s]["accuracy"] - runs[ref, s]["accuracy"] for s in cfg["seeds"]]
        assert vs["diffs"] == pytest.approx(diffs)
        m = sum(diffs) / len(diffs)
        half = 12.706 * math.sqrt(sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)) / math.sqrt(len(diffs))
        assert (vs["mean"], *vs["ci95"]) == pytest.approx((m, m - half, m + half))

    # the arms did what their kind says: LoRA keeps r * (in + out); SoRA / AdaLoRA retain less than they start with
    for s in cfg["seeds"]:
        assert runs["LoRA r=4", s]["params"] == 2 * runs["LoRA r=2", s]["params"]
        assert runs["SoRA r=4 keep 0.5", s]["params"] < runs["SoRA r=4 keep 0.5", s]["params_start"]
        assert runs["AdaLoRA 4->2", s]["params"] < runs["AdaLoRA 4->2", s]["params_start"]
        assert len(runs["SoRA r=4 scheduler", s]["stages"]) == 2


    # the generative task: only the arms that name it (an arm's `tasks`), scored by exact match of generated sums
    ar = res["tasks"]["arithmetic"]
    assert ar["metric"] == "exact_match" and set(ar["zero_shot"]) == {"validation", "test"}
    only = {a["name"] for a in cfg["arms"] if "arithmetic" in a.get("tasks", cfg["tasks"])}
    assert only == {"LoRA r=2", "SoRA r=4 keep 0.5"}
    assert {r["arm"] for r in ar["runs"]} == only and set(ar["lr"]) == {"lora", "sora"}
    assert len(ar["runs"]) == len(only) * len(cfg["seeds"])
    # its per_task length, curve interval and tuning seeds, through the recipe (a run's steps are the recipe's own)
    assert ar["steps"] == 12 != tr["steps"] == cfg["steps"] and ar["warmup_steps"] == 2 * cfg["warmup_steps"]
    assert {r["steps"] for r in ar["runs"] + ar["tuning"]} == {12} and {r["steps"] for r in tr["runs"]} == {6}
    assert {r["seed"] for r in ar["tuning"]} == {1} and {s for r in ar["tuning"] for s, _ in r["curve"]} == {4, 8, 12}
    assert "12 steps, warmup 2" in md
    assert "## arithmetic (test exact_match)" in md


def test_arithmetic_task_files_are_disjoint_sums(tmp_path):
    mod = _module()
    task = mod.arithmetic({"n_test": 30, "n_validation": 20, "n_train": 100, "arithmetic_max": 99}, tmp_path)
    seen = {}
    for split in ("test", "validation", "train"):
        rows = [json.loads(line)["messages"] for line in open(task[split])]
        assert len(rows) == {"test": 30, "validation": 20, "train": 100}[split]
        for system, user, answer in rows:
            a, b = (int(x) for x in user["content"].removeprefix("What is ").removesuffix("?").split(" + "))
            assert answer["content"] == str(a + b) and system["content"] == mod.ARITH_SYSTEM
            assert seen.setdefault((a, b), split) == split  # a pair in one split only
    assert task["eval"] == {"eval_max_new_tokens": mod.ARITH_NEW_TOKENS}


def test_arithmetic_max_out_of_range_is_named_before_any_run(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: tiny\ntasks: [arithmetic]\narithmetic_max: 5\nlrs: {lora: [1.0e-3]}\n"
                   "arms:\n  - {name: LoRA r=2, method: lora, r: 2}\n")
    with pytest.raises(SystemExit, match=r"arithmetic_max = 5: allowed 10 to 999"):
        _module().main(["--config", str(bad), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_render_merges_grids_run_task_by_task(tmp_path):
    mod = _module()
    cfg = {"arms": [], "tasks": ["a"], "model": "tiny", "steps": 1, "batch_size": 1, "lr_scheduler_type": "cosine",
           "warmup_steps": 0, "target_modules": ["q_proj"], "alpha_per_rank": 2.0, "seeds": [0], "lrs": {},
           "tune_seeds": [0]}
    task = {"metric": "exact_match", "test_majority": None, "tuning": [], "lr": {}, "stats": []}
    grid = {"command": "grid", "config": cfg, "partial": False, "wall_s": 10,
            "tasks": {"a": {**task, "runs": [{"arm": "x", "stages": []}]}}}
    other = {"command": "other", "config": {**cfg, "tasks": ["b"], "per_task": {"b": {"steps": 3}}}, "partial": False,
             "wall_s": 5, "tasks": {"b": {**task, "runs": [], "steps": 3, "warmup_steps": 0}}}
    zs = {"command": "zs", "config": cfg, "partial": False, "wall_s": 1,
          "tasks": {"a": {**task, "runs": [], "zero_shot": {"validation": 0.5, "test": 0.25}}}}
    for i, r in enumerate((grid, other, zs)):
        (tmp_path / f"{i}.json").write_text(json.dumps(r))
    res = mod.main(["--render", *(str(tmp_path / f"{i}.json") for i in range(3)), "--out", str(tmp_path / "out")])
    assert list(res["tasks"]) == ["a", "b"] and res["wall_s"] == 16 and res["partial"] is False
    assert res["tasks"]["a"]["runs"] == [{"arm": "x", "stages": []}]  # the empty runs of the zero-shot file did not win
    assert res["tasks"]["a"]["zero_shot"] == {"validation": 0.5, "test": 0.25}
    assert res["config"]["per_task"] == {"b": {"steps": 3}}  # a later file's config keys win too
    md = (tmp_path / "out" / "quality_grid.md").read_text()
    assert "test 25.0%" in md and "## a (" in md and "## b (" in md
    assert md.split("## b (")[0].count("1 steps, warmup 0") == 1 and "3 steps, warmup 0" in md.split("## b (")[1]


def test_runs_from_pairs_every_arm_with_the_other_grids_runs_seed_by_seed(tmp_path):
    mod = _module()
    arms = [{"name": "LoRA r=4", "method": "lora", "r": 4}, {"name": "LoRA r=2", "method": "lora", "r": 2},
            {"name": "SoRA", "method": "sora", "r": 8}]
    cfg = {"arms": arms, "tasks": ["a"], "model": "tiny", "steps": 1, "batch_size": 1, "lr_scheduler_type": "cosine",
           "warmup_steps": 0, "target_modules": ["q_proj"], "alpha_per_rank": 2.0, "seeds": [0, 1, 2],
           "lrs": {"lora": [1e-3], "sora": [3e-3]}, "tune_seeds": [0]}

    def runs(arm, lr, params, accs):
        return [{"arm": arm, "lr": lr, "seed": s, "accuracy": a, "params": params, "stages": []}
                for s, a in enumerate(accs)]

    task = {"metric": "exact_match", "test_majority": None, "tuning": [], "stats": []}
    grid = {"command": "grid", "config": cfg, "partial": False, "wall_s": 1, "tasks": {"a": {
        **task, "lr": {"lora": 1e-3, "sora": 3e-3}, "runs": runs("LoRA r=4", 1e-3, 400, [0.1, 0.2, 0.3]) +
        runs("LoRA r=2", 1e-3, 200, [0.1, 0.1, 0.1]) + runs("SoRA", 3e-3, 250, [0.5, 0.6, 0.4])}}}
    check = {"command": "check", "config": {**cfg, "arms": arms[:1], "lrs": {"lora": [3e-3]}}, "partial": False,
             "tasks": {"a": {**task, "lr": {"lora": 3e-3}, "runs": runs("LoRA r=4", 3e-3, 400, [0.4, 0.7, 0.4])}}}
    for name, r in (("grid", grid), ("check", check)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    direct = {row["arm"]: row for row in mod.statistics(cfg, grid["tasks"]["a"]["runs"])}
    assert direct["SoRA"]["vs_lora"]["ref"] == "LoRA r=2"  # nearer in log params than r=4
    res = mod.main(["--render", str(tmp_path / "grid.json"), "--runs-from", str(tmp_path / "check.json"),
                    "--out", str(tmp_path / "out")])
    rows = {row["arm"]: row for row in res["tasks"]["a"]["stats"]}
    assert set(rows) == {"LoRA r=4", "SoRA"}  # the grid's own LoRAs (at the other lr) are gone
    assert rows["LoRA r=4"]["lr"] == 3e-3 and res["tasks"]["a"]["lr"]["lora"] == 3e-3
    assert rows["SoRA"]["vs_lora"]["ref"] == "LoRA r=4"
    assert rows["SoRA"]["vs_lora"]["diffs"] == pytest.approx([0.1, -0.1, 0.0])  # seed by seed: 0.5-0.4, 0.6-0.7, ...
    assert "taken from" in (tmp_path / "out" / "quality_grid.md").read_text()
    # another method works the same way: SoRA at another lr, paired with the grid's own LoRAs
    sora = {"command": "sora check", "config": {**cfg, "arms": arms[2:], "lrs": {"sora": [1e-2]}}, "partial": False,
            "tasks": {"a": {**task, "lr": {"sora": 1e-2}, "runs": runs("SoRA", 1e-2, 250, [0.3, 0.3, 0.3])}}}
    (tmp_path / "sora.json").write_text(json.dumps(sora))
    res = mod.main(["--render", str(tmp_path / "grid.json"), "--runs-from", str(tmp_path / "sora.json"),
                    "--out", str(tmp_path / "out2")])
    rows = {row["arm"]: row for row in res["tasks"]["a"]["stats"]}
    assert set(rows) == {"LoRA r=4", "LoRA r=2", "SoRA"} and res["tasks"]["a"]["lr"] == {"lora": 1e-3, "sora": 1e-2}
    assert rows["SoRA"]["lr"] == 1e-2 and rows["SoRA"]["vs_lora"]["diffs"] == pytest.approx([0.2, 0.2, 0.2])
    bad = {**check, "config": {**check["config"], "arms": [{"name": "LoRA r=9", "method": "lora", "r": 9}]}}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(SystemExit, match="LoRA r=9"):
        mod.main(["--render", str(tmp_path / "grid.json"), "--runs-from", str(tmp_path / "bad.json"),
                  "--out", str(tmp_path / "x")])


def test_a_runs_folder_the_grid_did_not_make_is_refused_and_kept(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "mine.txt").write_text("user data")
    with pytest.raises(SystemExit, match=r"runs exists and was not made by this script"):
        _module().main(["--tiny", "--out", str(tmp_path)])
    assert (tmp_path / "runs" / "mine.txt").read_text() == "user data"
