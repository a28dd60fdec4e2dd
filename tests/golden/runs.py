"""Golden runs: reference training runs whose fp32 CPU numbers are pinned, bit for bit.

    tests/golden/<name>.json  <── python -m tests.golden.update [--which NAME ...]
            │                      (runs each reference job, writes what it produced)
            └──> tests/golden/test_golden.py runs the same job today and compares:
                 loss and grad norm per step (exact float reprs), a digest of every final
                 parameter and optimizer moment; then, as likely causes of a difference,
                 torch, the demo dataset and its packages, and the config

Each run is the real entry point, `python -m launch.train` (under torchrun for the
distributed one), in its own process with one intra-op thread per rank
(`job.cpu_threads = 1`, OMP_NUM_THREADS=1): with more threads MKL's matrix products
round by memory alignment and nothing is bitwise. The final parameters and AdamW
moments come from the checkpoint the run writes after its last step.

What the numbers depend on besides our code, and so what each file records under
`depends_on`: the torch build and the CPU's vector ISA (torch picks kernels by
`torch.backends.cpu.get_cpu_capability()`), the number of ranks, and for the demo
dataset its exact bytes (sha256; the builder reads Python's standard library and
scikit-learn / scikit-image data, encodes video with PyAV, trains a tokenizer) and the
packages that decode it at training time (Pillow, PyAV).

Only the numbers fail the test; when they differ, the failure also lists what changed
besides the code (torch, dataset, packages, config) as likely causes. Known limit: the
files pin one kind of machine (the one CI runs on: x86-64, torch's cpu build, the ISA
recorded); elsewhere the test skips and says why.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from tests.distributed.launcher import ROOT, torchrun

HERE = Path(__file__).resolve().parent
DEMO = "<demo dataset>"  # stands for the demo dataset's folder in recorded configs/commands
RUN_DIR = "<run dir>"
DATA_PACKAGES = ("numpy", "pillow", "av", "scikit-image", "scikit-learn", "tokenizers")


@dataclass(frozen=True)
class GoldenRun:
    """One reference job: `launch.train` on configs/tiny.toml with these overrides."""

    about: str
    data: str  # "demo" (the README's dataset, built fresh) or "synthetic"
    steps: int
    nproc: int = 1
    overrides: tuple[str, ...] = field(default_factory=tuple)
    # also run the job with these overrides instead and record its losses as "reference_loss"
    # (the report memory policy's file records the store-all curve it is held to)
    reference_overrides: tuple[str, ...] | None = None
    # the test re-runs only the first `check_steps` steps of a long run (the full run's
    # learning-rate schedule kept through optim.decay_steps) and compares their losses and
    # grad norms; the file still records every step and the final tensors (update.py)
    check_steps: int | None = None

    def argv(self, data_dir: str, run_dir: str, overrides: tuple[str, ...] | None = None,
             steps: int | None = None) -> list[str]:
        uri = data_dir if self.data == "demo" else "synthetic"
        argv = ["--config", "configs/tiny.toml", "--data.uri", uri,
                "--train.steps", str(self.steps), "--checkpoint.interval", str(self.steps),
                "--job.tensorboard", "false", "--job.cpu_threads", "1",
                *(self.overrides if overrides is None else overrides), "--job.run_dir", run_dir]
        if steps is not None and steps != self.steps:  # stop early on the whole run's schedule
            from trainer.config import load_config

            optim = load_config(argv).optim
            decay = optim.decay_steps or max(self.steps - optim.warmup_steps, 1)
            argv += ["--train.steps", str(steps), "--checkpoint.interval", str(steps),
                     "--optim.decay_steps", str(decay)]
        return argv


RUNS: dict[str, GoldenRun] = {
    "tiny_demo": GoldenRun(
        "the README's demo job for its first 20 steps: tiny preset, one process, demo dataset",
        data="demo", steps=20),
    "tiny_synthetic": GoldenRun(
        "tiny preset, one process, the built-in synthetic generator, 20 steps",
        data="synthetic", steps=20),
    "dep_pp2_vpp2_ep2_dp2": GoldenRun(
        "the README's distributed demo job for 4 steps: 4 gloo ranks, pp=2 vpp=2 ep=2 dp=2, "
        "DEP, demo dataset",
        data="demo", steps=4, nproc=4,
        overrides=("--parallel.pp", "2", "--parallel.vpp", "2", "--parallel.ep", "2",
                   "--parallel.dp", "2", "--parallel.encoder", "dep")),
    "tiny_report_memory": GoldenRun(
        "tiny preset, one process, synthetic data, 100 steps with the report memory policy "
        "(recompute, FP8-E4M3 expert inputs with a scale per row, offload); reference_loss: "
        "the same job storing every activation",
        data="synthetic", steps=100, overrides=("--memory.policy", "report"),
        reference_overrides=("--memory.policy", "none"), check_steps=25),
}


def golden_path(name: str) -> Path:
    return HERE / f"{name}_fp32_cpu.json"


def build_demo_dataset(out: str | os.PathLike) -> Path:
    """The README's demo dataset (launch.make_dataset with its defaults)."""
    from launch.make_dataset import build

    build(str(out))
    return Path(out)


def dataset_sha256(folder: str | os.PathLike) -> str:
    """Digest of every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def machine() -> dict:
    """The machine kind the numbers are valid on (a mismatch skips the comparison)."""
    return {"system": platform.system(), "machine": platform.machine(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


def depends_on(run: GoldenRun, data_dir: str | None) -> dict:
    out = {"torch": torch.__version__, **machine(), "python": platform.python_version(),
           "ranks": run.nproc, "cpu_threads_per_rank": 1, "OMP_NUM_THREADS": "1"}
    if run.data == "demo":
        out["demo_dataset_sha256"] = dataset_sha256(data_dir)
        out["packages"] = {name: metadata.version(name) for name in DATA_PACKAGES}
    return out


def _tensor_digest(tensor: torch.Tensor) -> str:
    t = tensor.detach().cpu().contiguous()
    head = f"{t.dtype}{tuple(t.shape)}".encode()
    return hashlib.sha256(head + t.view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


def _generalised_config(config: dict, data_dir: str | None) -> dict:
    """The run's resolved config with this machine's paths replaced by placeholders."""
    config = json.loads(json.dumps(config))
    config["job"]["run_dir"] = RUN_DIR
    if data_dir is not None and config["data"]["uri"] == data_dir:
        config["data"]["uri"] = DEMO
    return config


def execute(name: str, data_dir: str | None, work_dir: str | os.PathLike,
            with_reference: bool = True, steps: int | None = None) -> dict:
    """Run the reference job `name` now; return the record a golden file holds (the test
    leaves out the reference run: only the update records it). `steps`: stop after these
    (the record then holds the tensors of that step)."""
    from trainer.checkpoint import read_tensors

    run = RUNS[name]
    if run.data == "demo" and data_dir is None:
        raise ValueError(f"golden run {name} trains on the demo dataset: pass its folder")
    run_dir = Path(work_dir) / name
    records = _train(name, run.nproc, run.argv(str(data_dir), str(run_dir), steps=steps), run_dir)
    tensors = read_tensors(run_dir / "checkpoints" / f"step_{steps or run.steps:08d}")
    command = " ".join(["python -m launch.train" if run.nproc == 1 else
                        f"torchrun --nproc-per-node {run.nproc} -m launch.train",
                        *run.argv(DEMO, RUN_DIR)])
    return {
        "name": name,
        "about": run.about,
        "update": f"python -m tests.golden.update --which {name}  (read its docstring first)",
        "command": command,
        "depends_on": depends_on(run, data_dir),
        "config": _generalised_config(
            json.loads((run_dir / "config.json").read_text()), data_dir),
        "steps": [r["step"] for r in records],
        "loss": [repr(r["loss"]) for r in records],
        "grad_norm": [repr(r["grad_norm"]) for r in records],
        "final_tensors_sha256": {k: _tensor_digest(v) for k, v in sorted(tensors.items())
                                 if k.startswith(("model.", "optim."))},
        **({} if run.reference_overrides is None or not with_reference else {"reference_loss": [
            repr(r["loss"]) for r in _train(name, run.nproc, run.argv(
                str(data_dir), str(run_dir) + "_reference", run.reference_overrides),
                Path(str(run_dir) + "_reference"))]}),
    }


def _train(name: str, nproc: int, argv: list[str], run_dir: Path) -> list[dict]:
    """Run `launch.train argv` (under torchrun for several ranks); its metrics records."""
    if nproc == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        proc = subprocess.run([sys.executable, "-m", "launch.train", *argv], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise AssertionError(f"golden run {name} failed ({proc.returncode}):\n"
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    else:
        torchrun("launch.train", nproc, *argv, timeout=900)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def load(name: str) -> dict:
    return json.loads(golden_path(name).read_text())


def write(record: dict) -> Path:
    path = golden_path(record["name"])
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


def machine_mismatch(golden: dict) -> str | None:
    """Why the golden numbers cannot apply on this machine, or None."""
    recorded = {k: golden["depends_on"][k] for k in machine()}
    if recorded != machine():
        return (f"golden {golden['name']} was recorded on {recorded}; this machine is "
                f"{machine()}: fp32 kernels round differently on another ISA, so the bitwise "
                "comparison only runs on the recorded kind of machine")
    return None


def _config_differences(golden: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(golden) | set(now)):
        a, b = golden.get(key, "<absent>"), now.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: golden {a!r}, now {b!r}")
    return out


def _series_difference(label: str, golden: list[str], now: list[str]) -> str | None:
    if golden == now:
        return None
    differing = [i for i, (a, b) in enumerate(zip(golden, now)) if a != b]
    if not differing:
        return f"{label}: golden has {len(golden)} steps, now {len(now)}"
    first = differing[0]
    equal = f"steps 0-{first - 1} equal" if first else "no step equal before it"
    return (f"{label}: first differs at step {first}: now {now[first]}, golden {golden[first]} "
            f"(diff {float(now[first]) - float(golden[first]):.3g}; {equal}; "
            f"{len(differing)} of {len(golden)} steps differ)")


def differences(golden: dict, now: dict) -> list[str]:
    """What differs in the numbers (empty: the run is bitwise the same). Only the numbers
    fail the test: a new config key, a package bump or a new torch that leave every bit as
    it was are no reason to rewrite the files."""
    problems = []
    checked = len(now["loss"])  # a run stopped early (check_steps) compares its steps only
    for label in ("loss", "grad_norm"):
        problem = _series_difference(label, golden[label][:checked], now[label])
        if problem:
            problems.append(problem)
    if checked < len(golden["loss"]):
        return problems
    want, got = golden["final_tensors_sha256"], now["final_tensors_sha256"]
    differing = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    if differing:
        problems.append(f"final tensors: {len(differing)} of {len(want)} differ "
                        f"(parameters and AdamW moments), first: {differing[:3]}")
    return problems


def likely_causes(golden: dict, now: dict) -> list[str]:
    """What changed besides our code since the numbers were recorded: torch, the demo
    dataset and the packages that build and decode it, the resolved config."""
    causes = []
    if golden["depends_on"]["torch"] != now["depends_on"]["torch"]:
        causes.append(f"torch {golden['depends_on']['torch']} -> {now['depends_on']['torch']}")
    for key in ("demo_dataset_sha256", "packages"):
        if golden["depends_on"].get(key) != now["depends_on"].get(key):
            causes.append(f"demo dataset input {key}: {golden['depends_on'].get(key)} -> "
                          f"{now['depends_on'].get(key)} (launch/make_dataset.py or the packages "
                          "it reads and decodes with)")
    causes += [f"config {d}" for d in _config_differences(golden["config"], now["config"])]
    return causes


def report(golden: dict, problems: list[str], causes: list[str]) -> str:
    since = ("\nChanged since the recording (besides the code):\n  " + "\n  ".join(causes)
             if causes else "\nNothing besides the code changed since the recording "
                            "(same torch, dataset, packages and config).")
    return (f"golden run {golden['name']} ({golden['about']}) is no longer bitwise the same as "
            f"{golden_path(golden['name']).relative_to(ROOT)}:\n  " + "\n  ".join(problems)
            + since
            + f"\nIf the change is meant to change numerics, rewrite the file with "
              f"`python -m tests.golden.update --which {golden['name']}` and name the change "
              "and why in the commit message (tests/golden/update.py says when that is "
              "legitimate).")
