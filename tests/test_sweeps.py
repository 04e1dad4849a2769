"""Hydra sweeps through the CLI: summary table, reward-curve comparison, DDP children, Optuna."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from conftest import FAST, compose
from test_train import run_cli

from lit_vhead.run import main, metric_value

SHORT = ["ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.generation.max_new_tokens=8",
         "logger=csv", "callbacks=none"]


@pytest.mark.slow
def test_grid_sweep_writes_a_summary_table_and_a_comparison_plot(tmp_path):
    result = run_cli(["-m", "head.init=null,normal", "ppo.learning_rate=1e-5,3e-5", *SHORT,
                      f"hydra.sweep.dir={tmp_path}"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    combos = {(o.split()[0], o.split()[1]) for o in (r["overrides"] for r in rows)}
    grid = {(f"head.init={i}", f"ppo.learning_rate={lr}") for i in ("null", "normal") for lr in ("1e-05", "3e-05")}
    assert combos == grid
    assert all(float(r["env/reward_mean"]) > 0 and r["run_dir"].endswith(r["job"]) for r in rows)
    assert "env/reward_mean" in result.stdout and "summary.csv" in result.stdout
    assert (tmp_path / "rewards.png").stat().st_size > 1000
    assert all((tmp_path / j / "curves.png").is_file() for j in "0123")


@pytest.mark.slow
def test_ddp_multirun_does_not_start_a_second_sweep(tmp_path):
    report = ["+callbacks.report._target_=helpers_callbacks.RankReport",
              "+callbacks.report.output_dir=${paths.output_dir}"]  # each rank writes rank<k>.json into its run dir
    result = run_cli(["-m", "head.init=null,normal", "trainer=ddp", "trainer.devices=2", *SHORT, *report,
                      f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path,
                     env_extra={"PYTHONPATH": str(Path(__file__).parent)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("Launching 2 jobs locally") == 1
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir()) == ["0", "1"]
    assert not (tmp_path / "outputs").exists()  # no stray run or sweep tree from the child ranks
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "rank1.json").is_file()  # rank 1 ran inside its job dir
    with open(tmp_path / "sweep" / "summary.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


@pytest.mark.slow
def test_optuna_search_maximises_the_optimized_metric(tmp_path):
    result = run_cli(["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=3",
                      "hydra.sweeper.sampler.n_startup_trials=2", *SHORT, f"hydra.sweep.dir={tmp_path}"],
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert set(best["best_params"]) == {"ppo.learning_rate", "ppo.init_kl_coef", "head.init"}
    with open(tmp_path / "summary.csv") as f:
        rewards = [float(r["env/reward_mean"]) for r in csv.DictReader(f)]
    assert len(rewards) == 3 and best["best_value"] == pytest.approx(max(rewards))


def test_main_returns_the_optimized_metric(tmp_path):
    cfg = compose(FAST + ["optimized_metric=objective/kl"], tmp_path)
    value = main(cfg)
    assert isinstance(value, float)
    logged = json.loads((tmp_path / "metrics.json").read_text())["objective/kl"]
    assert value == pytest.approx(logged)
    with pytest.raises(ValueError, match="no/such.*was not logged"):
        metric_value({"a": 1.0}, "no/such")


def test_ddp_children_fix_is_in_force_only_inside_its_block(tmp_path):
    """Lightning's launchers build their DDP child command with their own function again once the block ends (also
    when it raises), and outside a multirun the block changes nothing."""
    import lightning.fabric.strategies.launchers.subprocess_script as fabric_launcher
    import lightning.pytorch.strategies.launchers.subprocess_script as pytorch_launcher
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import read_write

    from lit_vhead.sweep import _job_subprocess_cmd, ddp_children_of_this_job

    launchers = (fabric_launcher, pytorch_launcher)
    originals = [launcher._hydra_subprocess_cmd for launcher in launchers]
    cfg = compose(FAST, tmp_path)
    with ddp_children_of_this_job():  # a single run: nothing to fix
        assert [launcher._hydra_subprocess_cmd for launcher in launchers] == originals
    with read_write(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig().set_config(cfg)
    with ddp_children_of_this_job():
        assert all(launcher._hydra_subprocess_cmd is _job_subprocess_cmd for launcher in launchers)
    assert [launcher._hydra_subprocess_cmd for launcher in launchers] == originals
    with pytest.raises(RuntimeError, match="fit failed"), ddp_children_of_this_job():
        raise RuntimeError("fit failed")
    assert [launcher._hydra_subprocess_cmd for launcher in launchers] == originals
    compose(FAST, tmp_path)  # later tests see a single run again
