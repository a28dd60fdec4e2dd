"""Plans, computed without running anything.

    python -m launch.plan --model k25                          parameter counts of a preset
    python -m launch.plan --schedule --pp 4 --vpp 2 --microbatches 8
                                                               each rank's pipeline actions, checked
                                                               and simulated (bubble, Gantt in ASCII)
"""
from __future__ import annotations

import argparse
import sys

from model.config import ConfigError, PRESETS, preset
from model.param_count import count
from parallel.schedule import format_schedule, schedule
from parallel.schedule_sim import check_schedule, format_timeline, simulate


def _fmt(n: int) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="k25", help=f"one of {sorted(PRESETS)}")
    parser.add_argument("--schedule", action="store_true", help="print a pipeline schedule")
    parser.add_argument("--pp", type=int, default=4)
    parser.add_argument("--vpp", type=int, default=2)
    parser.add_argument("--microbatches", type=int, default=8)
    args = parser.parse_args(argv)
    if args.schedule:
        return print_schedule(args.pp, args.vpp, args.microbatches)
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


def print_schedule(pp: int, vpp: int, microbatches: int) -> int:
    try:
        actions = schedule(pp, vpp, microbatches)
    except ValueError as e:
        print(f"schedule error: {e}", file=sys.stderr)
        return 2
    check_schedule(actions, pp, vpp, microbatches)
    result = simulate(actions, pp, vpp, forward_cost=1.0, backward_cost=2.0)
    ideal = (pp - 1) / (vpp * microbatches)
    print(f"interleaved 1F1B pp={pp} vpp={vpp} microbatches={microbatches}: deadlock-free")
    print(format_schedule(actions))
    print(format_timeline(result))
    print(f"simulated bubble (F=1, B=2): {result.bubble_fraction:.4f}   "
          f"theory (pp-1)/(vpp*m): {ideal:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
