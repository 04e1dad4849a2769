"""Exact resume after SIGKILL, atomic saves, and bad input that must fail clearly without losing work."""

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from conftest import FAST, ROOT, compose
from hydra.errors import ConfigCompositionException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException
from test_train import read_csv, run_cli

from lit_vhead.checkpoint_io import AtomicCheckpointIO
from lit_vhead.config import as_ppo_config
from lit_vhead.run import train

RESUME_ARGS = ["ppo.steps=8", "ppo.batch_size=8", "ppo.mini_batch_size=4", "ppo.generation.max_new_tokens=8",
               "logger=csv", "callbacks.model_checkpoint.every_n_epochs=2", "callbacks.progress_bar=null",
               "plot=false", "trainer.deterministic=true"]
TIMING = ("time/",)


def child_env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, **extra}


def metric_rows(run_dir):
    """Each PPO step's metrics, timings dropped (they are wall-clock)."""
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in read_csv(run_dir)]


def same_optimizer_state(a: dict, b: dict) -> bool:
    """Two optimizer state dicts hold the same groups and the same state tensors, bit for bit."""
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(torch.equal(torch.as_tensor(a["state"][i][k]), torch.as_tensor(b["state"][i][k]))
               for i in a["state"] for k in a["state"][i])


@pytest.mark.slow
@pytest.mark.parametrize("critic", [[], ["critic=model", "critic.learning_rate=3e-4"]], ids=["head", "model"])
def test_sigkill_then_resume_reproduces_the_uninterrupted_run_exactly(tmp_path, critic):
    """Weights (the critic's too), optimizer state and PPO state after a SIGKILL and a resume are bitwise those of
    the uninterrupted run."""
    full, killed, args = tmp_path / "full", tmp_path / "killed", RESUME_ARGS + critic
    result = run_cli(args + [f"hydra.run.dir={full}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, f"hydra.run.dir={killed}"],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics_file = killed / "csv" / "metrics.csv"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once step 5 is logged: the step-4 checkpoint (epochs 0-3) exists
        if metrics_file.is_file() and len(metrics_file.read_text().splitlines()) >= 6:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "last.ckpt").is_file()
    assert len(read_csv(killed)) < 8  # it really died mid-run

    result = run_cli(RESUME_ARGS + [f"hydra.run.dir={killed}", "ckpt_path=last"], cwd=tmp_path)  # the run's config
    assert result.returncode == 0, result.stderr[-3000:]
    assert metric_rows(killed) == metric_rows(full)  # every metric of every step, bit for bit (as CSV text)
    a = torch.load(full / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert any(k.startswith("critic.") for k in a["state_dict"]) == bool(critic)
    assert same_optimizer_state(a["optimizer_states"][0], b["optimizer_states"][0])
    assert a["ppo_state"] == b["ppo_state"]


def test_checkpoint_holds_the_ppo_state(tmp_path):
    train(compose(FAST + ["callbacks=default", "callbacks.progress_bar=null", "ppo.use_score_scaling=true"],
                  tmp_path))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["ppo_state"]["kl_ctl"]["value"] != 0.2  # the adaptive coefficient moved and was saved
    assert ckpt["ppo_state"]["score_moments"]["count"] > 0
    assert any(k.startswith("policy.v_head.") for k in ckpt["state_dict"])
    assert not any(k.startswith("reference") for k in ckpt["state_dict"])  # rebuilt from the pretrained source
    assert ckpt["optimizer_states"] and ckpt["optimizer_states"][0]["state"]  # Adam moments


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmpfs, tmp_path):
    """Checkpoints on their own filesystem (the system temp dir elsewhere), full as PPO step 1's checkpoint is saved."""
    checkpoints = tmpfs("64m")
    overrides = ["callbacks=default", "callbacks.progress_bar=null", "callbacks.model_checkpoint.every_n_epochs=1",
                 f"callbacks.model_checkpoint.dirpath={checkpoints}",
                 f"callbacks.last_checkpoint.dirpath={checkpoints}",
                 f"+callbacks.fill.directory={checkpoints}",
                 "+callbacks.fill._target_=helpers_callbacks.FillDisk", "+callbacks.fill.at_epoch=1"]
    cfg = compose(FAST + overrides, tmp_path)
    with pytest.raises(OSError) as err:
        train(cfg)
    assert err.value.errno == errno.ENOSPC and "ppo-step0001.ckpt" in str(err.value)
    assert sorted(os.listdir(checkpoints)) == ["filler", "last.ckpt", "ppo-step0000.ckpt"]  # nothing partial
    for name in ("last.ckpt", "ppo-step0000.ckpt"):
        assert torch.load(checkpoints / name, weights_only=True)["epoch"] == 0  # whole, from PPO step 0


def test_nan_loss_mid_run_stops_clearly_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = compose(FAST + ["callbacks=default", "callbacks.progress_bar=null",
                          "callbacks.model_checkpoint.every_n_epochs=1", "reward=function",
                          "reward.fn._target_=helpers_rewards.explodes_after_two_calls"], tmp_path)
    with pytest.raises(FloatingPointError, match="PPO step 2.*last checkpoint is intact"):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("bad", ["nan", "raise"])
def test_reward_that_fails_names_the_reward_source(tmp_path, bad):
    from lit_vhead.rewards import RewardError

    target = {"nan": "helpers_rewards.nan_for_the_first", "raise": "helpers_rewards.raises"}[bad]
    with pytest.raises(RewardError, match=target.replace(".", r"\.")):
        train(compose(FAST + ["reward=function", f"reward.fn._target_={target}"], tmp_path))


def test_resume_with_another_architecture_is_a_clear_error(tmp_path):
    train(compose(FAST + ["callbacks=default", "callbacks.progress_bar=null"], tmp_path))
    cfg = compose(FAST + ["callbacks=default", "ppo.steps=6", "ckpt_path=last", "model.config.n_embd=32"], tmp_path)
    with pytest.raises(ValueError, match="another model or PEFT config.*n_embd|another model or PEFT config"):
        train(cfg)


def test_truncated_lightning_checkpoint_is_a_clear_error(tmp_path):
    train(compose(FAST + ["callbacks=default", "callbacks.progress_bar=null"], tmp_path))
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:1000])
    with pytest.raises(ValueError, match="last.ckpt"):
        train(compose(FAST + ["callbacks=default", "ppo.steps=6", "ckpt_path=last"], tmp_path))


def test_tokenizer_without_pad_or_eos_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    from lit_vhead.builders import build_tokenizer

    tok_dir = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
                            ).save_pretrained(tok_dir)
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        build_tokenizer({"tokenizer": str(tok_dir), "kind": "causal"})


def test_empty_and_overlong_prompts_fail_before_training(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("hello\n" + "x" * 300 + "\n")
    with pytest.raises(ValueError, match="more than the limit"):
        train(compose(FAST + [f"data.prompts={prompts}", "data.max_prompt_tokens=1000"], tmp_path / "a"))
    with pytest.raises(ValueError, match="empty"):
        train(compose(FAST + ["data.prompts=['hello','  ']"], tmp_path / "b"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match=rf"prompts file '{empty}' holds no prompts"):  # names the file
        train(compose(FAST + [f"data.prompts={empty}"], tmp_path / "c"))


KEYS = {
    "ppo.batch_size": st.integers(-4, 64),
    "ppo.mini_batch_size": st.integers(-2, 16),
    "ppo.kl_penalty": st.sampled_from(["kl", "abs", "mse", "full", "k3", "k2", "KL", ""]),
    "head.init": st.sampled_from(["null", "normal", "xavier", "Normal", "zeros"]),
    "ppo.learning_rate": st.sampled_from(["1e-4", "0.1", "abc", "-"]),
    "ppo.generation.max_new_tokens": st.integers(-1, 300),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(sorted(KEYS)), st.none(), min_size=1).flatmap(
    lambda d: st.fixed_dictionaries({k: KEYS[k] for k in d})))
def test_any_override_is_accepted_valid_or_rejected_naming_the_key(tmp_path, overrides):
    """Property: an override either gives a config that passes validation, or an error naming the bad key."""
    args = [f"{k}={v}" for k, v in overrides.items()]
    try:
        cfg = compose(args, tmp_path)
        ppo = as_ppo_config(cfg.ppo)
    except (ConfigCompositionException, OmegaConfBaseException, ValueError) as err:
        text = str(err) + str(err.__cause__ or "")
        assert any(k.split(".")[-1] in text or str(v) in text for k, v in overrides.items()), text
        return
    assert ppo.batch_size % ppo.mini_batch_size == 0 and ppo.generation.max_new_tokens >= 1
    assert cfg.head.init in (None, "normal")


def test_responses_that_end_at_once_train():
    """A response whose first token is EOS has length 1 (the EOS is kept): the score lands there, nothing is NaN."""
    from lit_vhead.generation import response_mask_from_eos
    from lit_vhead.ppo import compute_advantages, compute_rewards, ppo_loss

    response = torch.tensor([[1, 0, 0, 0], [5, 6, 1, 0], [7, 8, 9, 10]])
    mask = response_mask_from_eos(response, eos_token_id=1)
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    logprobs, values = torch.randn(3, 4), torch.randn(3, 4)
    rewards, _, _ = compute_rewards(torch.tensor([2.0, 0.0, 0.0]), logprobs, logprobs, mask.float(), 0.2)
    assert rewards[0].tolist() == [2.0, 0.0, 0.0, 0.0]
    values, advantages, returns = compute_advantages(values, rewards, mask.float(), 1.0, 0.95)
    pg, vf, _ = ppo_loss(logprobs, values, logprobs, values, mask.float(), advantages, returns, 0.2, 0.2, 0.1)
    assert torch.isfinite(pg) and torch.isfinite(vf)


def test_one_token_responses_train_end_to_end(tmp_path):
    metrics = train(compose(FAST + ["ppo.generation.max_new_tokens=1"], tmp_path))
    assert metrics["tokens/responses_len_mean"] == 1.0 and all(map(lambda v: v == v, metrics.values()))


def test_default_path_makes_no_network_connection(tmp_path, monkeypatch):
    """Security: the default run (tiny model, byte tokenizer, CSV logger) opens no connection beyond loopback."""
    import socket

    connect = socket.socket.connect

    def local_only(sock, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and not (host.startswith("127.") or host in ("localhost", "::1") or "/" in host):
            raise AssertionError(f"network connection attempted to {address}")
        return connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert train(compose(FAST, tmp_path))["env/reward_mean"] > 0


# Writes versions 0, 1, 2... of a 64 MiB checkpoint to argv[1] for ever, the way Lightning's ModelCheckpoint does.
CHECKPOINT_WRITER = """
import sys, torch
from lit_vhead.checkpoint_io import AtomicCheckpointIO
io, version = AtomicCheckpointIO(), 0
while True:
    io.save_checkpoint({"version": version, "weights": torch.arange(2**24, dtype=torch.float32) + version}, sys.argv[1])
    version += 1
"""


def test_sigkill_during_a_checkpoint_write_on_another_filesystem_leaves_a_whole_last_ckpt(tmpfs, tmp_path):
    """The run dir on a tmpfs, the system temp dir on the disk: Lightning's own save copied across them straight
    into last.ckpt, so a kill during the copy tore it and leaked the temp file."""
    run, system_tmp = tmpfs("300m"), tmp_path / "system-tmp"
    system_tmp.mkdir()
    last = run / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", CHECKPOINT_WRITER, str(last)], env=child_env(TMPDIR=str(system_tmp)),
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not last.is_file():
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "timeout"
            time.sleep(0.01)
        first = os.stat(last)
        while True:  # kill as a write lands: a file appears beside last.ckpt, or last.ckpt itself changes
            now = os.stat(last)
            if len(os.listdir(run)) > 1 or (now.st_ino, now.st_size, now.st_mtime_ns) != (
                    first.st_ino, first.st_size, first.st_mtime_ns):
                break
            assert time.time() < deadline, "no second write seen"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ckpt = torch.load(last, weights_only=True)
    assert torch.equal(ckpt["weights"], torch.arange(2**24, dtype=torch.float32) + ckpt["version"])
    assert list(system_tmp.iterdir()) == []  # nothing went through (or leaked into) the system temp dir
    AtomicCheckpointIO().save_checkpoint({"version": -1}, last)  # the next save removes what the killed one left
    assert os.listdir(run) == ["last.ckpt"] and torch.load(last, weights_only=True) == {"version": -1}


def test_full_disk_on_another_filesystem_leaves_no_partial_checkpoint(tmpfs, tmp_path, monkeypatch):
    """A full run dir while the system temp dir has room: the old save copied a truncated ppo-step0002.ckpt into
    place; now the write fails with ENOSPC, that path never appears and the earlier checkpoints are whole."""
    run = tmpfs("2600k")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # what Lightning's save would stage its file in
    io = AtomicCheckpointIO()
    one_mib = torch.ones(2**18)
    io.save_checkpoint({"step": 1, "weights": one_mib}, run / "ppo-step0001.ckpt")
    io.save_checkpoint({"step": 1, "weights": one_mib}, run / "last.ckpt")
    with pytest.raises(OSError) as err:
        io.save_checkpoint({"step": 2, "weights": one_mib}, run / "ppo-step0002.ckpt")
    assert err.value.errno == errno.ENOSPC and "ppo-step0002.ckpt" in str(err.value)
    assert sorted(os.listdir(run)) == ["last.ckpt", "ppo-step0001.ckpt"]  # no partial file, no temp file
    for name in ("last.ckpt", "ppo-step0001.ckpt"):
        assert torch.equal(torch.load(run / name, weights_only=True)["weights"], one_mib)


def test_the_cli_writes_checkpoints_beside_themselves_not_through_the_system_temp_dir(tmp_path, monkeypatch):
    """configs/trainer gives the Trainer AtomicCheckpointIO: with no usable system temp dir, checkpoints still save
    (Lightning's own save stages every checkpoint there)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-dir"))
    overrides = FAST + ["ppo.steps=2", "callbacks=default", "callbacks.progress_bar=null",
                        "callbacks.model_checkpoint.every_n_epochs=1"]
    # The undo copy of a PPO update needs a temporary file: without one the run stops at once and says where to put it.
    with pytest.raises(ValueError, match=rf"temporary file in '{tmp_path}/no-such-dir', which cannot hold one "
                       r"\(No such file or directory\): point ppo.undo_dir at a writable directory"):
        train(compose(overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()
    train(compose(overrides + [f"ppo.undo_dir={tmp_path}"], tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == [
        "last.ckpt", "ppo-step0000.ckpt", "ppo-step0001.ckpt"]
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1


def test_resume_drops_a_metrics_row_torn_by_a_kill(tmp_path):
    """A kill while step 2's row was being written leaves part of it, without its newline, at the end of the file."""
    from lit_vhead.loggers import CSVLogger

    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text(
        "env/reward_mean,epoch,ppo/step,step\n0.5,0,0.0,0\n0.75,1,1.0,1\n0.8")
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.keep_before_step = 2  # resuming from the checkpoint taken after PPO step 1
    logger.log_metrics({"env/reward_mean": 1.0, "epoch": 2, "ppo/step": 2.0}, step=2)
    logger.save()
    assert [row["ppo/step"] for row in read_csv(tmp_path)] == ["0.0", "1.0", "2.0"]
    assert all(value != "" for row in read_csv(tmp_path) for value in row.values())


def test_prompts_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("héllo\nworld\n".encode() + b"caf\xff\n")
    with pytest.raises(ValueError, match=rf"prompts file '{prompts}', line 3: byte 0xff is not UTF-8"):
        train(compose(FAST + [f"data.prompts={prompts}"], tmp_path / "run"))
    prompts.write_bytes("\ufeffhéllo\nworld\n".encode())  # UTF-8 with a byte-order mark reads as UTF-8
    from lit_vhead.data import load_prompts

    assert load_prompts(prompts) == ["héllo", "world"]
