"""Time and peak memory of `launch.convert` import and export, per model preset.

    .venv/bin/python -m benchmarks.convert --preset tiny small

For each preset: a random DeepseekV3ForCausalLM with the preset's LM sizes is saved with
transformers (fp32, its own 5 GiB shards), then imported and exported again, each in its
own process; the table gives the checkpoint size, the wall time and the peak resident
memory (ru_maxrss) of each conversion process. Peak memory well below the checkpoint size
is the point: both directions stream one tensor at a time. Needs transformers ([test]).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from model.config import preset
from model.hf_config import lm_config_to_hf


def _make_hf(name: str, out: Path) -> int:
    """Save the random HF checkpoint in a child process; its size in bytes."""
    code = (
        "import json, sys, torch, transformers\n"
        "cfg = transformers.DeepseekV3Config(**json.loads(sys.argv[1]))\n"
        "torch.manual_seed(0)\n"
        "transformers.DeepseekV3ForCausalLM(cfg).float().save_pretrained(sys.argv[2])\n")
    hf = lm_config_to_hf(preset(name).lm)
    hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type", "rope_scaling",
                                                   "rope_theta")}
    subprocess.run([sys.executable, "-c", code, json.dumps(hf), str(out)], check=True)
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


def _run(args: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of `python -m launch.convert ARGS` in a fresh process."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "launch.convert", *args],
                             stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"launch.convert {' '.join(args)} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", nargs="+", default=["tiny", "small"])
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.preset:
            root = Path(tmp) / name
            size = _make_hf(name, root / "hf")
            wall_i, rss_i = _run(["import", "--from", "hf", str(root / "hf"), "--to",
                                  str(root / "ckpt"), "--vision-preset", name])
            wall_e, rss_e = _run(["export", "--from", str(root / "ckpt"), "--to", "hf",
                                  str(root / "hf2")])
            rows.append((name, size, wall_i, rss_i, wall_e, rss_e))
    print(f"{'preset':8} {'checkpoint MiB':>14} {'import s':>9} {'import peak MiB':>16} "
          f"{'export s':>9} {'export peak MiB':>16}")
    for name, size, wall_i, rss_i, wall_e, rss_e in rows:
        print(f"{name:8} {size / 2**20:14.0f} {wall_i:9.1f} {rss_i:16.0f} {wall_e:9.1f} "
              f"{rss_e:16.0f}")
    _, baseline = _run(["--help"])
    print(f"(python -m launch.convert --help alone, i.e. python + torch: {baseline:.0f} MiB)")


if __name__ == "__main__":
    main()
