"""Plans, computed without running anything.

    python -m launch.plan --model k25                          parameter counts of a preset
    python -m launch.plan --model k25 --pp 16 --vpp 2 --ep 16 --dp 16 --seq-len 4096 \\
        --micro-batch 1 --global-batch 4096 [--gpu h800] [--precision bf16] [--all] [--json]
                                                               what each pipeline rank holds
                                                               and does per step, and whether
                                                               it fits (trainer/planner.py)
        [--memory-policy report]                               under a memory policy (issue 15)
        [--memory-policies]                                    the fullest rank under none, each
                                                               tool of `report` alone and `report`,
                                                               with AdamW and MuonClip: which fits
    python -m launch.plan --model k25 ... --optimizer compare  AdamW vs MuonClip: each rank's
                                                               memory, side by side
    python -m launch.plan --schedule --pp 4 --vpp 2 --microbatches 8
                                                               each rank's pipeline actions, checked
                                                               and simulated (bubble, Gantt in ASCII)
"""
from __future__ import annotations

import argparse
import json
import sys

from model.config import ConfigError, PRESETS, preset
from model.param_count import count
from parallel.schedule import Op, format_schedule, schedule
from parallel.schedule_sim import check_schedule, format_timeline, simulate
from model.memory_policy import MemoryPolicy, report_tools
from trainer.config import JobConfig, load_config
from trainer.hardware import GPUS
from trainer.planner import (DEFAULT_EFFICIENCY, GIB, RESERVED_BYTES, MediaMix, Plan, RankPlan,
                             Recipe, fullest_ranks, plan)

OPTIMIZERS = ("adamw", "muonclip")
# the flags that ask for a plan (without any, `--model` prints parameter counts)
PLAN_FLAGS = ("pp", "vpp", "ep", "dp", "seq_len", "micro_batch", "global_batch", "layout", "gpu",
              "precision", "optimizer", "encoder", "media", "efficiency", "memory_policy")


def _fmt(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3f}{unit}"
    return str(n)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.plan", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="k25", help=f"model preset: one of {sorted(PRESETS)} "
                   "(default k25)")
    p.add_argument("--schedule", action="store_true",
                   help="print, check and simulate a pipeline schedule (--pp, --vpp, "
                        "--microbatches) instead")
    p.add_argument("--microbatches", type=int, default=8,
                   help="--schedule only: microbatches per replica (default 8)")
    p.add_argument("--ep-overlap", type=float, metavar="A2A", default=None,
                   help="--schedule only: pair steady-state forwards and backwards (FB) as "
                        "--parallel.ep_overlap does, with A2A the all-to-all time of each F "
                        "and each B (F=1, B=2; e.g. 0.3), and compare with the plain schedule")
    plan_flags = p.add_argument_group("planning a run (any of these asks for a plan)")
    plan_flags.add_argument("--pp", type=int, help="pipeline stages (default 1; --schedule: 4)")
    plan_flags.add_argument("--vpp", type=int,
                            help="virtual stages per pipeline rank (default 1; --schedule: 2)")
    plan_flags.add_argument("--ep", type=int, help="expert-parallel size (default 1)")
    plan_flags.add_argument("--dp", type=int, help="data-parallel size (default 1)")
    plan_flags.add_argument("--seq-len", type=int, help="tokens per sequence (default 4096)")
    plan_flags.add_argument("--micro-batch", type=int, help="sequences per microbatch (default 1)")
    plan_flags.add_argument("--global-batch", type=int,
                            help="sequences per step over all replicas (default: 4 x pp "
                                 "microbatches per replica)")
    plan_flags.add_argument("--layout", help="'auto' (default) or an explicit layout such as "
                                             "'Et|(tt|)*30L' (parallel/layout.py)")
    plan_flags.add_argument("--gpu", choices=sorted(GPUS),
                            help="GPU whose memory, peak and links the plan uses (default h800, "
                                 "the K2.5 report's; constants in trainer/hardware.py)")
    plan_flags.add_argument("--precision", choices=("fp32", "bf16"),
                            help="fp32 (today; default) or bf16 weights with fp32 grads, "
                                 "master weights and state (issue 12)")
    plan_flags.add_argument("--optimizer", choices=OPTIMIZERS + ("compare",),
                            help="adamw (default: two fp32 moments) or muonclip (one momentum "
                                 "for hidden matrices, issue 16); compare: both, each rank's "
                                 "memory side by side")
    plan_flags.add_argument("--encoder", choices=("dep", "colocated"),
                            help="where the vision encoder runs (default dep)")
    plan_flags.add_argument("--media",
                            help="media per sequence as COUNT*TxHxW items, e.g. "
                                 "'2*1x32x32,0.25*4x16x16' (mean count, frames, patch rows x "
                                 "columns); adds text-only vs DEP vs colocated step times")
    plan_flags.add_argument("--efficiency", type=float,
                            help=f"fraction of the bf16 peak matmuls sustain in the time model "
                                 f"(default {DEFAULT_EFFICIENCY})")
    plan_flags.add_argument("--memory-policy", choices=sorted(report_tools()),
                            help="what autograd keeps for backward (model/memory_policy.py): "
                                 "none (default), report, or one of report's tools alone: "
                                 "recompute, fp8, offload")
    plan_flags.add_argument("--memory-policies", action="store_true",
                            help="instead of the rank table: the fullest rank under each of "
                                 "those policies with AdamW and with MuonClip, and which fits")
    plan_flags.add_argument("--all", action="store_true",
                            help="every pipeline rank (default: the first, a middle, the last "
                                 "and the one with the largest peak)")
    plan_flags.add_argument("--json", action="store_true", help="one JSON object per rank")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.schedule:
        return print_schedule(args.pp or 4, 2 if args.vpp is None else args.vpp,
                              args.microbatches, args.ep_overlap)
    try:
        if (any(getattr(args, f) is not None for f in PLAN_FLAGS) or args.all or args.json
                or args.memory_policies):
            return print_plan(args)
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


def print_plan(args: argparse.Namespace) -> int:
    if args.memory_policies:
        cfg, gpu = job_of(args)
        print(format_policies(cfg, gpu, args.precision or "fp32",
                              MediaMix.parse(args.media or "")))
        return 0
    if args.optimizer == "compare":
        if args.json:
            print("--json prints one plan: choose --optimizer adamw or muonclip", file=sys.stderr)
            return 2
        results = {name: make_plan(args, name) for name in OPTIMIZERS}
        print(format_optimizer_comparison(results, _shown(args, list(results.values()))))
        return 0
    result = make_plan(args, args.optimizer or "adamw")
    shown = [result.ranks[r] for r in _shown(args, [result])]
    if args.json:
        for rank in shown:
            print(json.dumps(rank_json(result, rank)))
    else:
        print(format_plan(result, shown))
    return 0


def _shown(args: argparse.Namespace, plans: list[Plan]) -> list[int]:
    """Pipeline ranks to print: all, or the first, a middle, the last and the largest peak."""
    pp = len(plans[0].ranks)
    if args.all:
        return list(range(pp))
    worst = {max(p.ranks, key=lambda r: r.peak).pp_rank for p in plans}
    return sorted({0, pp // 2, pp - 1} | worst)


def job_of(args: argparse.Namespace):
    """The job config and GPU the command line describes (validated sizes)."""
    pp, vpp, dp, mb = args.pp or 1, args.vpp or 1, args.dp or 1, args.micro_batch or 1
    overrides = {"model.preset": args.model, "parallel.pp": pp, "parallel.vpp": vpp,
                 "parallel.ep": args.ep or 1, "parallel.dp": dp,
                 "parallel.encoder": args.encoder or "dep",
                 "parallel.layout": args.layout or "auto",
                 "data.seq_len": args.seq_len or 4096, "train.micro_batch": mb,
                 "train.global_batch": args.global_batch or 4 * pp * dp * mb,
                 "data.uri": "synthetic"}
    cfg = load_config([a for k, v in overrides.items() for a in (f"--{k}", str(v))])
    cfg.validate_sizes()
    return cfg, GPUS[args.gpu or "h800"]


def make_plan(args: argparse.Namespace, optimizer: str) -> Plan:
    cfg, gpu = job_of(args)
    set_policy(cfg, report_tools()[args.memory_policy or "none"])
    return plan(cfg, recipe=Recipe(args.precision or "fp32", optimizer),
                media=MediaMix.parse(args.media or ""), gpu=gpu,
                efficiency=args.efficiency or DEFAULT_EFFICIENCY)


def set_policy(cfg: JobConfig, policy: MemoryPolicy) -> None:
    """The job's [memory] section for a policy (a preset's name, or custom lists)."""
    m = cfg.memory
    if policy.name in ("none", "report"):
        m.policy, m.recompute, m.fp8, m.offload = policy.name, [], [], []
    else:
        m.policy = "custom"
        m.recompute, m.fp8, m.offload = (sorted(policy.recompute), sorted(policy.fp8),
                                         sorted(policy.offload))
    cfg.memory.to_policy()  # validates


def format_policies(cfg: JobConfig, gpu, precision: str, media: MediaMix) -> str:
    """The fullest pipeline rank under each memory policy, AdamW vs MuonClip."""
    recipes = {o: Recipe(precision, o) for o in ("adamw", "muonclip")}
    policies = report_tools()
    worst = fullest_ranks(cfg, policies, recipes, media=media, attention="flash")
    budget = gpu.memory_bytes - RESERVED_BYTES
    p = cfg.parallel
    lines = [f"model {cfg.model.preset}: pp={p.pp} vpp={p.vpp} ep={p.ep} dp={p.dp} = "
             f"{p.pp * p.dp} GPUs of {gpu.name} ({gpu.memory_bytes / GIB:.1f} GiB, "
             f"{budget / GIB:.2f} usable), seq_len {cfg.data.seq_len}, micro_batch "
             f"{cfg.train.micro_batch}, precision {precision}, media {media.describe()}",
             "the fullest pipeline rank under each memory policy (GiB per GPU; host: what "
             "the policy offloads to CPU memory, per GPU)", ""]
    header = (f"{'policy':<10}{'optimizer':<10}{'rank':>5}{'static':>9}{'activations':>13}"
              f"{'prefetched':>12}{'buffers':>9}{'peak':>9}{'host':>9}  verdict")
    lines.append(header)
    for name in policies:
        for opt in recipes:
            r = worst[name, opt]
            static = r.static + r.dep_embeddings
            over = (r.peak - budget) / GIB
            verdict = "fits" if over <= 0 else f"DOES NOT FIT (+{over:.1f})"
            lines.append(f"{name:<10}{opt:<10}{r.pp_rank:>5}{static / GIB:>9.2f}"
                         f"{r.activations / GIB:>13.2f}{r.prefetched / GIB:>12.2f}"
                         f"{r.pipeline_buffers / GIB:>9.2f}{r.peak / GIB:>9.2f}"
                         f"{r.offloaded / GIB:>9.2f}  {verdict}")
    lines += ["", "policies (model/memory_policy.py): recompute, fp8, offload = the report "
              "preset's lists alone; report = all three"]
    return "\n".join(lines)


def _budget(result: Plan) -> int:
    return result.gpu.memory_bytes - RESERVED_BYTES


def rank_json(result: Plan, rank: RankPlan) -> dict:
    """The figures of one rank (bytes, FLOPs, seconds) and the job's step, for scripts."""
    step = result.step
    return {
        "pp_rank": rank.pp_rank, "stages": rank.stages, "chunks": rank.chunks,
        "params": {k: g.params for k, g in rank.groups.items()},
        "zero1_group_size": {k: g.group_size for k, g in rank.groups.items()},
        "bytes": {"weights": rank.total("weights"), "grads": rank.total("grads"),
                  "master": rank.total("master"), "optimizer_state": rank.total("state"),
                  "activations": rank.activations, "pipeline_buffers": rank.pipeline_buffers,
                  "dep_embeddings": rank.dep_embeddings, "dep_recompute": rank.dep_recompute,
                  "dep_recompute_beside": rank.dep_recompute_beside,
                  "pixels": rank.pixels, "pixels_host": rank.pixels_host,
                  "offloaded": rank.offloaded,
                  "prefetched": rank.prefetched, "peak": rank.peak,
                  "budget": _budget(result)},
        "in_flight": {str(s): n for s, n in rank.in_flight.items()},
        "fits": rank.peak <= _budget(result), "flops": rank.flops,
        "comm_bytes": rank.comm, "compute_s": rank.compute_s,
        "all_to_all_s": rank.all_to_all_s,
        "job": {"step_s": step.step_s, "pipeline_s": step.pipeline_s, "bubble": step.bubble,
                "dep_s": step.dep_s, "optimizer_s": step.optimizer_s,
                "model_flops": step.model_flops, "mfu": step.mfu,
                "gpu": result.gpu.name, "precision": result.recipe.precision,
                "optimizer": result.recipe.optimizer, "encoder": result.encoder,
                "media": result.media.describe(),
                "comparison_step_s": {k: v.step_s for k, v in result.comparison.items()}},
    }


def _title(result: Plan, optimizer: str) -> list[str]:
    cfg, gpu = result.cfg, result.gpu
    p, t = cfg.parallel, cfg.train
    world = p.pp * p.dp
    nodes = -(-world // gpu.gpus_per_node)
    return [
        f"model {cfg.model.preset}: pp={p.pp} vpp={p.vpp} ep={p.ep} dp={p.dp} = {world} GPUs "
        f"({nodes} node(s) of {gpu.gpus_per_node} {gpu.name}), seq_len {cfg.data.seq_len}, "
        f"micro_batch {t.micro_batch}, global_batch {t.global_batch} "
        f"({cfg.microbatches_per_replica} microbatches per replica)",
        f"layout {cfg.pipeline_layout().notation()}, encoder {result.encoder}, precision "
        f"{result.recipe.precision}, optimizer {optimizer}, media {result.media.describe()}"
        + ("" if cfg.memory.policy == "none" else f", memory policy {cfg.memory.policy}"), ""]


WIDTH = 17  # one pipeline rank's column


def _header(ranks: list[int]) -> str:
    return f"{'':<44}" + "".join(f"{'pipeline rank ' + str(r):>{WIDTH}}" for r in ranks)


def format_optimizer_comparison(results: dict[str, Plan], shown: list[int]) -> str:
    """Each shown rank's memory (GiB) under each optimizer, and the ZeRO-1 step's time."""
    first = next(iter(results.values()))
    budget = _budget(first)
    lines = _title(first, " vs ".join(results)) + [_header(shown)]

    def row(name: str, values: list[str]) -> None:
        lines.append(f"{name:<44}" + "".join(f"{v:>{WIDTH}}" for v in values))
    for name, result in results.items():
        ranks = [result.ranks[r] for r in shown]
        row(f"{name} (GiB)", ["" for _ in ranks])
        row("  fp32 master weights", [f"{r.total('master') / GIB:.2f}" for r in ranks])
        row("  optimizer state", [f"{r.total('state') / GIB:.2f}" for r in ranks])
        row("  weights + grads + master + state", [
            f"{sum(r.total(k) for k in ('weights', 'grads', 'master', 'state')) / GIB:.2f}"
            for r in ranks])
        row("  peak", [f"{r.peak / GIB:.2f}" for r in ranks])
        row("  headroom", [f"{(budget - r.peak) / GIB:.2f}" for r in ranks])
    names = list(results)
    if len(names) == 2:
        a, b = (results[n] for n in names)
        row(f"optimizer state, {names[1]} / {names[0]}",
            [f"{b.ranks[r].total('state') / a.ranks[r].total('state'):.2f}" for r in shown])
    lines += ["", f"usable HBM per GPU {budget / GIB:.2f} GiB ({first.gpu.memory_bytes / GIB:.1f} "
              f"less {RESERVED_BYTES / GIB:g} reserved); ZeRO-1 step "
              + ", ".join(f"{n} {r.step.optimizer_s:.2f} s" for n, r in results.items())
              + " (time model: trainer/planner.py)"]
    return "\n".join(lines)


def format_plan(result: Plan, shown: list[RankPlan]) -> str:
    cfg, gpu, step = result.cfg, result.gpu, result.step
    t = cfg.train
    lines = _title(result, result.recipe.optimizer)
    width = WIDTH
    header = _header([r.pp_rank for r in shown])
    rows: list[tuple[str, list[str]]] = []

    def row(name: str, values: list[str]) -> None:
        rows.append((name, values))

    def gib(values: list[float]) -> list[str]:
        return [f"{v / GIB:.2f}" for v in values]

    row("chunks held (E embed, t layer, L head)", [" | ".join(r.chunks) for r in shown])
    for kind in ("dense", "expert", "encoder"):
        if any(kind in r.groups for r in shown):
            row(f"parameters, {kind} (B; ZeRO-1 over N ranks)",
                [f"{r.groups[kind].params / 1e9:.3f} /{r.groups[kind].group_size}"
                 if kind in r.groups else "-" for r in shown])
    row("memory (GiB)", ["" for _ in shown])
    row("  weights", gib([r.total("weights") for r in shown]))
    row("  gradients", gib([r.total("grads") for r in shown]))
    row("  fp32 master weights", gib([r.total("master") for r in shown]))
    row("  optimizer state", gib([r.total("state") for r in shown]))
    row("  activations at the schedule's peak", gib([r.activations for r in shown]))
    row("    chunk-microbatches in flight", [str(sum(r.in_flight.values())) for r in shown])
    if any(r.offloaded for r in shown):
        row("  prefetched back (one chunk-microbatch)", gib([r.prefetched for r in shown]))
    row("  pipeline buffers (chunk outputs)", gib([r.pipeline_buffers for r in shown]))
    if result.media.kinds:
        row("  DEP embeddings + grads (stage 0)", gib([r.dep_embeddings for r in shown]))
        row("  DEP encoder recompute (cool-down)", gib([r.dep_recompute for r in shown]))
        row("  pipeline held beside it", gib([r.dep_recompute_beside for r in shown]))
        row("  pixels it encodes, fp32 (normalised)", gib([r.pixels for r in shown]))
    row("  peak", gib([r.peak for r in shown]))
    budget = _budget(result)
    row(f"  usable HBM ({gpu.memory_bytes / GIB:.1f} less {RESERVED_BYTES / GIB:g} reserved)",
        gib([budget for _ in shown]))
    row("  headroom", gib([budget - r.peak for r in shown]))
    row("  verdict", ["fits" if r.peak <= budget else "DOES NOT FIT" for r in shown])
    if any(r.offloaded for r in shown):
        row("  offloaded to host memory", gib([r.offloaded for r in shown]))
    if result.media.kinds:
        steps = 1 + cfg.data.steps_decoded_ahead
        row(f"  pixels in host memory, uint8 ({steps} step{'s' * (steps > 1)})",
            gib([r.pixels_host for r in shown]))
    row("per step", ["" for _ in shown])
    row("  model TFLOP", [f"{r.flops / 1e12:,.0f}" for r in shown])
    row("  matmul time (s)", [f"{r.compute_s:.2f}" for r in shown])
    row("  expert all-to-all time, exposed (s)", [f"{r.all_to_all_s:.2f}" for r in shown])
    kinds = sorted({k for r in shown for k in r.comm},
                   key=lambda k: (not k.startswith("pipeline"), not k.startswith("expert"), k))
    row("communication sent per step (GiB)", ["" for _ in shown])
    for kind in kinds:
        row(f"  {kind}", gib([r.comm.get(kind, 0.0) for r in shown]))
    lines.append(header)
    lines += [f"{name:<44}" + "".join(f"{v:>{width}}" for v in values) for name, values in rows]
    tokens = t.global_batch * cfg.data.seq_len
    lines += ["", f"step {step.step_s:.2f} s = DEP {step.dep_s:.2f} + pipeline "
                  f"{step.pipeline_s:.2f} (bubble {100 * step.bubble:.1f}%) + ZeRO-1 step "
                  f"{step.optimizer_s:.2f}; {tokens / step.step_s:,.0f} tokens/s, MFU "
                  f"{100 * step.mfu:.1f}% ({gpu.peak_bf16_tflops:g} TFLOP/s peak, matmuls at "
                  f"{100 * result.efficiency:.0f}% of it)"]
    if result.comparison:
        text = result.comparison["text-only"].step_s
        parts = [f"{name} {s.step_s:.2f} s ({100 * text / s.step_s:.1f}% of text-only "
                 f"throughput)" for name, s in result.comparison.items() if name != "text-only"]
        lines.append(f"media {result.media.describe()}: text-only {text:.2f} s, "
                     + ", ".join(parts))
    lines.append("time model: crude (matmuls only, no overlap, data-sheet bandwidths); see "
                 "trainer/planner.py")
    return "\n".join(lines)


def print_schedule(pp: int, vpp: int, microbatches: int, a2a: float | None = None) -> int:
    """Print, check and simulate a schedule; with `a2a`, the EP-overlap one (FB pairs)
    against the plain one, both with that all-to-all time inside every F and B."""
    try:
        actions = schedule(pp, vpp, microbatches, ep_overlap=a2a is not None)
        if a2a is not None and not 0 <= a2a <= 1:
            raise ValueError(f"--ep-overlap {a2a}: the all-to-all time lies in [0, F=1]")
    except ValueError as e:
        print(f"schedule error: {e}", file=sys.stderr)
        return 2
    check_schedule(actions, pp, vpp, microbatches)
    result = simulate(actions, pp, vpp, forward_cost=1.0, backward_cost=2.0,
                      a2a_cost=a2a or 0.0, rendezvous=True)
    ideal = (pp - 1) / (vpp * microbatches)
    kind = "interleaved 1F1B" + (" with EP overlap (FB pairs)" if a2a is not None else "")
    print(f"{kind} pp={pp} vpp={vpp} microbatches={microbatches}: deadlock-free "
          "(buffered and rendezvous point-to-point)")
    print(format_schedule(actions))
    print(format_timeline(result))
    if a2a is None:
        print(f"simulated bubble (F=1, B=2): {result.bubble_fraction:.4f}   "
              f"theory (pp-1)/(vpp*m): {ideal:.4f}")
    else:  # an FB takes less than F + B, so "ideal" busy time is not the plain one
        plain = simulate(schedule(pp, vpp, microbatches), pp, vpp, forward_cost=1.0,
                         backward_cost=2.0, rendezvous=True)
        pairs = sum(a.op is Op.FB for rank in actions for a in rank)
        print(f"step time (F=1, B=2, all-to-all {a2a} of each): plain {plain.makespan:.2f}, "
              f"overlapped {result.makespan:.2f} ({pairs} FB pairs; "
              f"{result.makespan / plain.makespan:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
