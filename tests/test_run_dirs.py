"""A run and its dir: a resume takes the run's own config, a finished run is left as it is, a run owns its dir (also
against a concurrent process), last.ckpt follows every PPO step, and nothing is written before the first step that a
failed start would leave behind."""

import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml
from conftest import FAST, ROOT, compose
from test_train import read_csv, run_cli

import lit_vhead.module
from lit_vhead.rewards import RewardError
from lit_vhead.run import main, train
from lit_vhead.rundir import RunDirBusyError, own_run_dir

CHECKPOINTED = FAST + ["callbacks=default", "callbacks.progress_bar=null"]
HELPERS = os.path.dirname(os.path.abspath(__file__))


def snapshot(run_dir):
    """Every file and dir under ``run_dir`` with its size, mtime and bytes: what "changes nothing" compares."""
    found = {}
    for root, dirs, files in os.walk(run_dir):
        for name in dirs + files:
            path = os.path.join(root, name)
            stat = os.lstat(path)
            content = open(path, "rb").read() if os.path.isfile(path) and not os.path.islink(path) else None
            found[os.path.relpath(path, run_dir)] = (stat.st_size, stat.st_mtime_ns, content)
    return found


@pytest.fixture(autouse=True)
def fresh_wandb_process_state():
    """wandb keeps its first run's working directory for the whole process: a later bare ``wandb.init()`` in
    another test (tests/test_ppo_trainer.py runs the README's TRL loop) would write there. Start each test over."""
    yield
    import wandb

    wandb.teardown()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 3-PPO-step run (last.ckpt after every step, CSV and offline wandb logs, saved policy), with
    non-default overrides a resume must not need repeating: a LoRA policy, its PEFT reference, another learning rate."""
    run_dir = tmp_path_factory.mktemp("finished")
    overrides = CHECKPOINTED + ["ppo.steps=3", "peft=lora", "ref=peft", "ppo.learning_rate=3e-4", "logger=default"]
    train(compose(overrides, run_dir))
    return run_dir


@pytest.fixture
def run_copy(finished, tmp_path):
    shutil.copytree(finished, tmp_path / "run", symlinks=True)
    return tmp_path / "run"


@pytest.fixture
def no_model_built(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(lit_vhead.module, "build_policy", fail)


def test_resume_takes_the_runs_saved_config(run_copy):
    """The README's resume form with nothing but ckpt_path=last and more steps: the run's LoRA policy, learning rate
    and loggers come from its checkpoint (with this command's defaults the optimizer's parameter groups would not
    match)."""
    train(compose(["ckpt_path=last", "ppo.steps=5"], run_copy))
    assert [int(float(r["ppo/step"])) for r in read_csv(run_copy)] == [0, 1, 2, 3, 4]
    ckpt = torch.load(run_copy / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 4 and any("lora_A" in k for k in ckpt["state_dict"])
    assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == 3e-4
    assert ckpt["run_config"]["config"]["ppo"]["steps"] == 5  # the next resume continues from this config
    written = yaml.safe_load((run_copy / ".hydra" / "config.yaml").read_text())
    assert written["peft"]["_target_"] == "peft.LoraConfig" and written["ppo"]["steps"] == 5
    assert written["ppo"]["learning_rate"] == 3e-4 and set(written["logger"]) == {"csv", "wandb"}
    assert "ppo.steps=5" in yaml.safe_load((run_copy / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.parametrize(
    "override, words",
    [
        ("model.config.n_layer=3", "model.config.n_layer=3: it would give the run another model or PEFT config"),
        ("peft=none", "peft=none: it would give the run another model or PEFT config"),
        ("ppo.learning_rate=1e-3", "another optimizer (learning rate) (ppo.learning_rate=0.0003 in the run)"),
        ("ppo.batch_size=16", "ppo.batch_size=16: it would give the run another batch shape"),
    ],
)
def test_resume_refuses_an_override_that_changes_the_model_optimizer_or_shapes(run_copy, no_model_built, override,
                                                                                 words):
    before = snapshot(run_copy)
    with pytest.raises(ValueError, match="Cannot resume with") as info:
        train(compose(["ckpt_path=last", "ppo.steps=5", override], run_copy))
    assert words in str(info.value) and "\n" not in str(info.value)
    assert snapshot(run_copy) == before


def test_resume_from_a_checkpoint_file_into_a_new_run_dir(finished, tmp_path):
    """ckpt_path=<file> works like ckpt_path=last: the checkpoint's run config, this command's overrides on top."""
    ckpt = finished / "checkpoints" / "last.ckpt"
    train(compose([f"ckpt_path={ckpt}", "ppo.steps=4", "logger=csv"], tmp_path / "new"))
    assert [int(float(r["ppo/step"])) for r in read_csv(tmp_path / "new")] == [3]
    written = yaml.safe_load((tmp_path / "new" / ".hydra" / "config.yaml").read_text())
    assert written["peft"]["_target_"] == "peft.LoraConfig" and list(written["logger"]) == ["csv"]
    assert not (tmp_path / "new" / "wandb").exists()


def test_resuming_a_finished_run_changes_nothing(run_copy, capsys):
    """Nothing to do: one line, exit status 0 (the finished run's metric is returned), and not one byte or mtime of
    the run dir changes: no metrics.json rewrite, no policy/ rewrite, no new wandb run."""
    before = snapshot(run_copy)
    value = main(compose(["ckpt_path=last"], run_copy))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("Nothing to do: ") and "ppo.steps=3" in out[0], out
    assert value == yaml.safe_load((run_copy / "metrics.json").read_text())["env/reward_mean"]
    assert snapshot(run_copy) == before


@pytest.mark.slow
def test_resuming_a_finished_run_from_the_cli_changes_nothing(run_copy):
    """The same through Hydra: its .hydra/ files are not rewritten either (lit_vhead.rundir.RunDirGuard)."""
    before = snapshot(run_copy)
    result = run_cli([f"hydra.run.dir={run_copy}", "ckpt_path=last"], cwd=run_copy.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("Nothing to do: ")
    assert snapshot(run_copy) == before


def test_a_run_that_fails_before_its_first_step_leaves_no_logger_output(tmp_path, capsys):
    """The reward passes its start-up probe, then fails in PPO step 0: no wandb run dir, no csv/, and through the CLI
    entry point no run dir at all."""
    fails = ["logger=default", "reward=function", "reward.fn._target_=helpers_rewards.RaisesOnCall",
             "reward.fn._partial_=false", "+reward.fn.call=2"]
    with pytest.raises(RewardError, match="went down at call 2"):
        train(compose(FAST + fails, tmp_path / "direct"))
    assert sorted(p.name for p in (tmp_path / "direct").iterdir()) == [".lock"]
    (tmp_path / "run" / ".hydra").mkdir(parents=True)  # as Hydra leaves it
    with pytest.raises(SystemExit):
        main(compose(FAST + fails, tmp_path / "run"))
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("Error: Reward source")
    assert not (tmp_path / "run").exists()


def test_a_run_killed_mid_run_has_last_ckpt_of_its_last_step_and_ends_wandb_quietly(tmp_path, capfd):
    """A run stopped in PPO step 2 (before the periodic checkpoint at step 10) resumes from last.ckpt of step 1, and
    its wandb run was ended without wandb's exit banner (raw ANSI codes in logs)."""
    import wandb

    fails = ["logger=wandb", "reward=function", "reward.fn._target_=helpers_rewards.RaisesOnCall",
             "reward.fn._partial_=false", "+reward.fn.call=4"]
    with pytest.raises(RewardError, match="went down at call 4"):
        train(compose(CHECKPOINTED + fails, tmp_path))
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
    assert wandb.run is None  # finished now, not at interpreter exit
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert "\x1b[" not in "".join(capfd.readouterr())


def test_a_fresh_run_never_appends_to_an_earlier_runs_metrics(tmp_path, no_model_built, monkeypatch):
    """Re-running from scratch in the dir of a run without checkpoints: refused, naming what is there."""
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("ppo/step,env/reward_mean\n0.0,1.0\n")
    with pytest.raises(FileExistsError, match=r"already holds an earlier run \(csv/metrics.csv\): pick a new"):
        train(compose(FAST, tmp_path))
    assert (tmp_path / "csv" / "metrics.csv").read_text() == "ppo/step,env/reward_mean\n0.0,1.0\n"


def test_a_run_dir_held_by_another_run_is_refused_and_kept(tmp_path, no_model_built, capsys):
    (tmp_path / ".hydra").mkdir()
    with own_run_dir(tmp_path):  # another open file description: as another process holds it
        with pytest.raises(RunDirBusyError, match="in use by another run"):
            train(compose(FAST, tmp_path))
        with pytest.raises(SystemExit):
            main(compose(FAST, tmp_path))
    assert "is in use by another run" in capsys.readouterr().out
    assert (tmp_path / ".hydra").is_dir()  # the other run's dir is not cleaned up as if it were this one's


def test_run_dirs_named_in_the_same_second_differ(tmp_path):
    """Two compositions a few milliseconds apart (two runs started together) name two run dirs."""
    first, second = (compose([], tmp_path).hydra.run.dir for _ in range(2))
    assert first != second and first.startswith("outputs/ppo/runs/")


@pytest.mark.slow
def test_concurrent_cli_runs_each_own_their_dir(tmp_path):
    """Real processes: (1) two runs started together with the default run dir get one dir each; (2) a run given the
    hydra.run.dir of a live run stops with one line and leaves that run (its .hydra/ included) alone."""
    env = {"PYTHONPATH": HELPERS}
    short = ["ppo.steps=2", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.generation.max_new_tokens=8",
             "logger=csv", "callbacks=none", "plot=false", "save_pretrained_dir=null"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", **env}

    def start(args, cwd):
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args], cwd=cwd, env=full_env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    (tmp_path / "together").mkdir()
    pair = [start(short, tmp_path / "together") for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in pair]
    assert [p.returncode for p in pair] == [0, 0], outputs
    runs = sorted((tmp_path / "together" / "outputs" / "ppo" / "runs").iterdir())
    assert len(runs) == 2 and all(len(read_csv(r)) == 2 for r in runs), runs

    shared, started, go = tmp_path / "shared", tmp_path / "started", tmp_path / "go"
    holder = start(short + [f"hydra.run.dir={shared}", "reward=function", "reward.fn._partial_=false",
                            "reward.fn._target_=helpers_rewards.WaitsForFile", f"+reward.fn.started={started}",
                            f"+reward.fn.go={go}"], tmp_path)
    deadline = time.time() + 240
    while not started.exists() and time.time() < deadline and holder.poll() is None:
        time.sleep(0.05)
    assert started.exists(), holder.communicate()[0]
    config = (shared / ".hydra" / "config.yaml").read_text()
    second = run_cli(short + [f"hydra.run.dir={shared}", "seed=7"], cwd=tmp_path, env_extra=env)
    go.touch()
    output = holder.communicate(timeout=300)[0]
    assert second.returncode == 1 and "Traceback" not in second.stdout + second.stderr
    assert second.stdout.strip().splitlines() == [
        f"Error: {shared} is in use by another run (it holds {shared / '.lock'}); give this run its own "
        "hydra.run.dir, or leave hydra.run.dir unset for a new one."]
    assert holder.returncode == 0, output
    assert len(read_csv(shared)) == 2 and (shared / ".hydra" / "config.yaml").read_text() == config
