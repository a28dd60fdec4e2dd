"""`python -m launch.plan --model k25`: parameter counts of a preset (nothing is allocated)."""
from __future__ import annotations

import argparse
import sys

from model.config import ConfigError, PRESETS, preset
from model.param_count import count


def _fmt(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="k25", help=f"one of {sorted(PRESETS)}")
    args = parser.parse_args(argv)
    try:
        cfg = preset(args.model)
        cfg.validate()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    c = count(cfg)
    rows = [("language model, total", c.lm_total),
            ("language model, active per token", c.lm_active),
            ("vision encoder + projector", c.vision_total),
            ("whole model, total", c.total),
            ("whole model, active per token", c.lm_active + c.vision_total)]
    print(f"model preset: {cfg.preset}")
    for name, n in rows:
        print(f"  {name:<34} {_fmt(n):>10}  ({n:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
