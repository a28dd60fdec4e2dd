"""The planner's activation bytes under each memory policy against a running engine.

The single-process engine runs `--memory.policy` (none, each tool of `report` alone,
`report`) for one step; after each microbatch's forward, the policy's own accounting
(model/saved_tensors.py: bytes alive on the device and in the host pool) must be within
5% of the plan's activations (device) and offloaded bytes (host). A planner that ignores
the job's policy (the mutant: every policy planned as `none`) misses.
"""
import pytest
import torch

from launch.plan import main as plan_main
from launch.plan import set_policy
from model.memory_policy import MemoryPolicy, report_tools
from trainer import planner
from trainer.config import load_config
from trainer.train import SingleProcessEngine, train

torch.set_num_threads(1)
TOLERANCE = 0.05
TEXT = ["--data.uri", "synthetic", "--data.media_per_seq", "0", "--train.steps", "1",
        "--train.global_batch", "2", "--data.seq_len", "96", "--optim.warmup_steps", "1"]
WIDE = ["--model.lm.hidden", "384", "--model.lm.heads", "6", "--model.lm.q_lora_rank", "128",
        "--model.lm.kv_lora_rank", "96", "--model.lm.num_experts", "8", "--model.lm.top_k", "2",
        "--model.lm.expert_hidden", "192", "--model.lm.dense_hidden", "1024"]


def measured_after_forward(cfg) -> list[dict[str, int]]:
    """Device and host bytes the engine's policy holds after each microbatch's forward."""
    engine = SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed,
                                 memory_policy=cfg.memory.to_policy())
    after, forward = [], engine.model.forward

    def measured_forward(*args, **kwargs):
        out = forward(*args, **kwargs)
        after.append(dict(engine.memory.live))
        return out

    engine.model.forward = measured_forward
    train(cfg, engine=engine)
    return after


def close(model: int, got: int) -> bool:
    return abs(model - got) <= TOLERANCE * got


@pytest.mark.parametrize("policy", list(report_tools()))
@pytest.mark.parametrize("extra", [[], WIDE], ids=["tiny", "wide"])
def test_single_process_engine_saves_what_the_plan_says(tmp_path, policy, extra):
    cfg = load_config(TEXT + extra + ["--job.run_dir", str(tmp_path)])
    set_policy(cfg, report_tools()[policy])
    cfg.validate(world_size=1)
    measured = measured_after_forward(cfg)
    assert len(measured) == 2 and measured[0] == measured[1]
    (plan,) = planner.plan_memory(cfg)
    assert close(plan.activations, measured[0]["device"]), (plan.activations, measured[0])
    assert close(plan.offloaded, measured[0]["host"]), (plan.offloaded, measured[0])
    if policy != "none":  # the mutant planner, blind to the policy
        set_policy(cfg, MemoryPolicy.preset("none"))
        (blind,) = planner.plan_memory(cfg)
        assert not (close(blind.activations, measured[0]["device"])
                    and close(blind.offloaded, measured[0]["host"]))


def test_plan_command_compares_policies_and_optimizers(capsys):
    assert plan_main(["--model", "tiny", "--seq-len", "128", "--memory-policies"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] and line.split()[0] in report_tools()]
    assert [(r[0], r[1]) for r in rows] == [(p, o) for p in report_tools()
                                           for o in ("adamw", "muonclip")]
    assert all(r[9] == "fits" for r in rows)  # tiny fits an H800 whatever the policy
    cfg = load_config(TEXT)
    worst = planner.fullest_ranks(cfg, report_tools(), {o: planner.Recipe("fp32", o)
                                                       for o in ("adamw", "muonclip")})
    peak = {k: r.peak for k, r in worst.items()}
    assert peak["report", "adamw"] < peak["recompute", "adamw"] < peak["none", "adamw"]
    assert peak["fp8", "adamw"] < peak["none", "adamw"]
    assert peak["none", "muonclip"] < peak["none", "adamw"]
    assert worst["none", "adamw"].offloaded == 0 < worst["offload", "adamw"].offloaded
