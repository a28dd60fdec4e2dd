"""Time and peak memory of `launch.convert` import and export, per model preset.

    .venv/bin/python -m benchmarks.convert --preset tiny small [--k25]

For each preset: a random DeepseekV3ForCausalLM with the preset's LM sizes (with --k25: a
Kimi K2.5 with the preset's LM and vision sizes, in the release's tensor names) is saved
with transformers (fp32, its own 5 GiB shards), then imported and exported again, each in its
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
from model.hf_config import k25_config_to_hf, lm_config_to_hf

_LM_ONLY = (
    "import json, sys, torch, transformers\n"
    "cfg = transformers.DeepseekV3Config(**json.loads(sys.argv[1]))\n"
    "torch.manual_seed(0)\n"
    "transformers.DeepseekV3ForCausalLM(cfg).float().save_pretrained(sys.argv[2])\n")
_K25 = (
    "import json, sys, pathlib, torch, transformers\n"
    "from safetensors.torch import load_file, save_file\n"
    "from tests.convert.hf_models import K25_RELEASED_NAMES\n"
    "cfg = transformers.Kimi_K25Config(**json.loads(sys.argv[1]))\n"
    "torch.manual_seed(0)\n"
    "transformers.Kimi_K25ForConditionalGeneration(cfg).float().save_pretrained(sys.argv[2])\n"
    "index = pathlib.Path(sys.argv[2]) / 'model.safetensors.index.json'\n"
    "def released(name):\n"
    "    for old, new in K25_RELEASED_NAMES:\n"
    "        name = new + name[len(old):] if name.startswith(old) else name\n"
    "    return name\n"
    "for file in pathlib.Path(sys.argv[2]).glob('*.safetensors'):\n"
    "    tensors = load_file(file)\n"
    "    save_file({released(k): v for k, v in tensors.items()}, file, metadata={'format': 'pt'})\n"
    "    del tensors\n"
    "if index.exists():\n"
    "    data = json.loads(index.read_text())\n"
    "    data['weight_map'] = {released(k): v for k, v in data['weight_map'].items()}\n"
    "    index.write_text(json.dumps(data))\n")


def _make_hf(name: str, out: Path, k25: bool) -> int:
    """Save the random HF checkpoint in a child process; its size in bytes."""
    cfg = preset(name)
    if k25:  # K2.5's encoder eps (the tiny/small presets train with 1e-6)
        cfg.vision.norm_eps = 1e-5
        hf = k25_config_to_hf(cfg)
        hf["text_config"] = {k: v for k, v in hf["text_config"].items()
                             if k not in ("architectures", "rope_scaling", "rope_theta")}
    else:
        hf = lm_config_to_hf(cfg.lm)
        hf = {k: v for k, v in hf.items() if k not in ("architectures", "model_type",
                                                       "rope_scaling", "rope_theta")}
    subprocess.run([sys.executable, "-c", _K25 if k25 else _LM_ONLY, json.dumps(hf), str(out)],
                   check=True)
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
    parser.add_argument("--k25", action="store_true",
                        help="Kimi K2.5 checkpoints (LM + vision tower + projector)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.preset:
            root = Path(tmp) / name
            size = _make_hf(name, root / "hf", args.k25)
            wall_i, rss_i = _run(["import", "--from", "hf", str(root / "hf"), "--to",
                                  str(root / "ckpt"), "--vision-preset", name])
            wall_e, rss_e = _run(["export", "--from", str(root / "ckpt"), "--to", "hf",
                                  str(root / "hf2")])
            rows.append((name, size, wall_i, rss_i, wall_e, rss_e))
    print("layout: " + ("Kimi K2.5 (LM + MoonViT + projector)" if args.k25 else
                        "DeepseekV3 (LM)"))
    print(f"{'preset':8} {'checkpoint MiB':>14} {'import s':>9} {'import peak MiB':>16} "
          f"{'export s':>9} {'export peak MiB':>16}")
    for name, size, wall_i, rss_i, wall_e, rss_e in rows:
        print(f"{name:8} {size / 2**20:14.0f} {wall_i:9.1f} {rss_i:16.0f} {wall_e:9.1f} "
              f"{rss_e:16.0f}")
    _, baseline = _run(["--help"])
    print(f"(python -m launch.convert --help alone, i.e. python + torch: {baseline:.0f} MiB)")


if __name__ == "__main__":
    main()
