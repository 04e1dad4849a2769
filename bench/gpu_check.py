"""GPU readiness in one short run (at most 8 minutes on one GPU): ONE line per check, ``PASS``/``FAIL`` and its key
figures. Run by ``bench/gpu_check.sh`` (see there for the environment it expects).

Checks (each a real PPO run through the CLI, ``python3 train.py trainer=gpu ...``, tiny GPT-2, 16 PPO steps, batch 16,
16 new tokens, CSV logger only, checkpoints at the end; or the benchmark):

- ``bf16-mixed``, ``16-mixed`` (its GradScaler: the final scale, read from ``last.ckpt``, must be finite and > 0),
  ``bf16-true``: every logged loss finite, the reward's first/last-4 means, seconds per PPO step;
- ``fsdp``: ``trainer=fsdp`` on one device, the same figures;
- ``ppo_step``: ``bench/ppo_step.py --preset gpt2-small --accelerator gpu --sides floor,ours,gemm``: ours vs the
  bare-transformers floor and the cuBLAS GEMM limit, peak CUDA memory. TRL 0.11.4 needs its own venv (its
  transformers 4.46 pin), which a GPU machine set up for lit_vhead lacks: the line says so.

``--cpu-dry-run`` runs the same checks on the CPU where Lightning allows it (``16-mixed`` and FSDP need CUDA and are
reported as such, after the command line and the parsing ran on bf16-mixed / 32-true), with the small ``workload``
preset for ``ppo_step``: it catches a broken command before a GPU's minutes are spent. Logs of a failed check are kept
and their path is printed in its line.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
RUN = [f"ppo.steps={STEPS}", "ppo.batch_size=16", "ppo.mini_batch_size=4", "ppo.generation.max_new_tokens=16",
       "logger=csv", "plot=false", "save_pretrained_dir=null", "sample_table_every=0", "~callbacks.progress_bar",
       f"callbacks.model_checkpoint.every_n_epochs={STEPS}"]


def python() -> str:
    return sys.executable or "python3"


def run(command: list[str], log: Path, timeout: float) -> tuple[bool, float, str]:
    """Run ``command`` from the repo root, output to ``log``; (ok, seconds, last error-looking line)."""
    tic = time.perf_counter()
    with open(log, "w") as out:
        try:
            done = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled"))
            ok = done.returncode == 0
        except subprocess.TimeoutExpired:
            ok = False
    seconds = time.perf_counter() - tic
    if ok:
        return True, seconds, ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line or "Exception" in line]
    reason = (errors or lines or [f"timed out after {timeout:.0f} s" if seconds >= timeout else "no output"])[-1]
    return False, seconds, (f"timed out after {timeout:.0f} s; " if seconds >= timeout else "") + reason[:300]


def cli_check(name: str, overrides: list[str], work: Path, timeout: float, scaler: bool = False) -> tuple[bool, str]:
    out = work / name
    ok, seconds, reason = run([python(), "train.py", *overrides, *RUN, f"hydra.run.dir={out}"], work / f"{name}.log",
                              timeout)
    if not ok:
        return False, f"train.py failed after {seconds:.0f} s: {reason} (log {work / f'{name}.log'})"
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    rewards = [float(r["env/reward_mean"]) for r in rows if r.get("env/reward_mean")]
    losses = [float(r["ppo/loss/total"]) for r in rows if r.get("ppo/loss/total")]
    step_s = [float(r["time/ppo/total"]) + float(r["time/ppo/generation"]) for r in rows if r.get("time/ppo/total")]
    finite = bool(losses) and all(math.isfinite(v) for v in losses)
    figures = (f"{len(rewards)} PPO steps, loss {'finite' if finite else 'NOT finite'} "
               f"(last {losses[-1]:.4g}), reward {statistics.mean(rewards[:4]):.3f} -> "
               f"{statistics.mean(rewards[-4:]):.3f} (first/last 4), {statistics.median(step_s[1:] or step_s):.3f} "
               f"s/PPO step, run {seconds:.0f} s")
    passed = finite and len(rewards) == STEPS
    if scaler:
        import torch

        state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        scale = (state.get("MixedPrecision") or {}).get("scale")
        scale = float(scale) if scale is not None else float("nan")
        passed = passed and math.isfinite(scale) and scale > 0
        figures += f", GradScaler scale {scale:g}"
    return passed, figures


def ppo_step_check(dry_run: bool, work: Path, timeout: float) -> tuple[bool, str]:
    if dry_run:
        args = ["--preset", "workload", "--accelerator", "cpu", "--steps", "1", "--warmup", "1"]
    else:
        args = ["--preset", "gpt2-small", "--accelerator", "gpu", "--steps", "3", "--warmup", "1", "--threads", "4"]
    ok, seconds, reason = run([python(), "bench/ppo_step.py", *args, "--sides", "floor,ours,gemm"],
                              work / "ppo_step.log", timeout)
    if not ok:
        return False, f"bench/ppo_step.py failed after {seconds:.0f} s: {reason} (log {work / 'ppo_step.log'})"
    result = json.loads([line for line in (work / "ppo_step.log").read_text().splitlines()
                         if line.startswith('{"bench": "ppo_step"')][-1])
    sides, ratios = result["sides"], result["ratios"]
    memory = sides["ours"].get("peak_cuda_mib")
    figures = (f"{result['workload']['preset']}: ours {sides['ours']['wall']['median']:.3f} s/PPO step, floor "
               f"{sides['floor']['wall']['median']:.3f} s (ours/floor {ratios['ours/floor']:.2f}x), GEMM limit "
               f"{sides['gemm']['wall']['median']:.3f} s ({sides['gemm']['gemm_gflop']:.0f} GFLOP; ours/limit "
               f"{ratios['ours/limit']:.1f}x)" + (f", peak CUDA {memory:.0f} MiB" if memory else "")
               + "; TRL 0.11.4 not run: it needs its own venv (transformers 4.46), absent here")
    return True, figures


# name -> the GPU command line's overrides, and what the CPU dry run runs instead (None: nothing runs on a CPU)
CLI_CHECKS = {
    "bf16-mixed": (["trainer=gpu", "trainer.precision=bf16-mixed"], ["trainer=cpu", "trainer.precision=bf16-mixed"]),
    "16-mixed": (["trainer=gpu", "trainer.precision=16-mixed"], ["trainer=cpu", "trainer.precision=bf16-mixed"]),
    "bf16-true": (["trainer=gpu", "trainer.precision=bf16-true"], ["trainer=cpu", "trainer.precision=bf16-true"]),
    "fsdp": (["trainer=fsdp"], None),
}
DRY_NOTES = {
    "16-mixed": "fp16 AMP needs CUDA: ran bf16-mixed, no GradScaler",
    "fsdp": "Lightning's FSDP needs CUDA: only composed the config",
}


def composes(name: str, overrides: list[str], work: Path) -> tuple[bool, str]:
    """Hydra composes the exact GPU command line (``--cfg job``: nothing is built or run)."""
    ok, _, reason = run([python(), "train.py", *overrides, *RUN, f"hydra.run.dir={work / name}", "--cfg", "job"],
                        work / f"{name}.compose.log", 120)
    return ok, reason


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-dry-run", action="store_true", help="the same checks on the CPU (see the docstring)")
    args = p.parse_args()
    dry = args.cpu_dry_run
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    failed = 0
    for name, (gpu, cpu) in [*CLI_CHECKS.items(), ("ppo_step", (None, None))]:
        try:
            if name == "ppo_step":
                passed, figures = ppo_step_check(dry, work, 300 if dry else 150)
            elif not dry:
                passed, figures = cli_check(name, gpu, work, 75, scaler=name == "16-mixed")
            else:
                passed, reason = composes(name, gpu, work)
                figures = "GPU command line composes" if passed else f"GPU command line does not compose: {reason}"
                if passed and cpu is not None:
                    passed, figures = cli_check(name, cpu, work, 150)
                figures += f" [cpu dry run{': ' + DRY_NOTES[name] if name in DRY_NOTES else ''}]"
        except Exception as error:  # a check's own parsing failed: report it, go on with the next check
            passed, figures = False, f"{type(error).__name__}: {error}"
        failed += not passed
        print(f"gpu_check {name:10s} {'PASS' if passed else 'FAIL'}  {figures}", flush=True)
    if not failed:
        shutil.rmtree(work, ignore_errors=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
