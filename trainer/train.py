"""The step loop: data -> engine step -> metrics, the same whatever the parallel layout.

One process (world size 1, every parallel size 1) uses the plain reference
engine; anything else uses the parallel engine over torch.distributed. Both
see the same global batch for a step: a data-parallel replica takes its rows.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from dataloader.batch import Batch
from dataloader.synthetic import SyntheticBatches, SyntheticConfig
from trainer.batch_inputs import model_inputs
from trainer.checkpoint import CheckpointManager
from trainer.config import JobConfig, to_dict
from trainer.lr_schedule import learning_rate
from trainer.flops import device_peak_tflops, model_flops, throughput_metrics
from trainer.metrics import MetricsWriter
from trainer.tensorboard import TensorBoardWriter
from trainer.profile import (RankInfo, peak_memory_bytes, step_spans, torch_profiler_trace,
                             write_profile)
from trainer.single_process import SingleProcessEngine


def synthetic_data(cfg: JobConfig) -> SyntheticBatches:
    return SyntheticBatches(SyntheticConfig(
        seq_len=cfg.data.seq_len, vocab_size=cfg.model.lm.vocab_size,
        media_token_id=cfg.model.media_token_id, patch_dim=cfg.model.vision.patch_dim,
        media_per_seq=cfg.data.media_per_seq, max_side=cfg.data.max_image_patches_side,
        max_frames=cfg.model.vision.max_frames, edge_cases=cfg.data.edge_cases),
        seed=cfg.train.seed)


def replica_microbatches(batch: Batch, dp_rank: int, dp: int, micro_batch: int) -> list[Batch]:
    """Rows of replica `dp_rank` of the global batch, cut into microbatches."""
    rows = batch.num_rows // dp
    mine = batch.rows(dp_rank * rows, (dp_rank + 1) * rows)
    return [mine.rows(start, start + micro_batch) for start in range(0, rows, micro_batch)]


def step_media(batch: Batch, dp: int, micro_batch: int):
    """DEP's view of the global batch: metadata of every media item, and a pixel fetcher."""
    from parallel.dep import StepMedia
    from parallel.dep_plan import MediaRef

    rows_per_replica = batch.num_rows // dp
    refs = [MediaRef(item_id=m.item_id, replica=m.row // rows_per_replica,
                     microbatch=(m.row % rows_per_replica) // micro_batch,
                     num_patches=m.num_patches, num_tokens=m.num_tokens) for m in batch.media]
    by_id = {m.item_id: m for m in batch.media}
    return StepMedia(refs=refs, grids={m.item_id: m.grid_thw for m in batch.media},
                     fetch=lambda items: [by_id[r.item_id].patches for r in items])


class DistributedEngine:
    """The parallel engine and its process groups (only for world size > 1)."""

    def __init__(self, cfg: JobConfig):
        from parallel.adamw import AdamWConfig
        from parallel.engine import ParallelEngine
        from parallel.topology import Topology, init_distributed

        init_distributed("gloo")
        self.topology = Topology(cfg.parallel_sizes)
        o = cfg.optim
        self.engine = ParallelEngine(
            cfg.model, self.topology, micro_batch=cfg.train.micro_batch, seq_len=cfg.data.seq_len,
            microbatches=cfg.microbatches_per_replica, seed=cfg.train.seed,
            adamw=AdamWConfig(beta1=o.beta1, beta2=o.beta2, eps=o.eps, weight_decay=o.weight_decay),
            grad_clip=o.grad_clip, encoder=cfg.parallel.encoder)
        self.cfg = cfg

    @property
    def stats(self) -> dict[str, float]:
        return self.engine.stats

    def step(self, batch: Batch, lr: float) -> tuple[float, float]:
        dp, micro = self.cfg.parallel.dp, self.cfg.train.micro_batch
        mbs = replica_microbatches(batch, self.topology.dp_rank, dp, micro)
        if self.cfg.parallel.encoder == "dep":
            return self.engine.step([model_inputs(b) for b in mbs], lr,
                                    media=step_media(batch, dp, micro),
                                    media_ids=[[m.item_id for m in b.media] for b in mbs])
        return self.engine.step([model_inputs(b) for b in mbs], lr)

    # checkpoint state: what this rank holds, by global name
    def named_tensors(self):
        return self.engine.named_tensors()

    def optimizer_state(self):
        return self.engine.optimizer_state()

    def empty_optimizer_state(self):
        return self.engine.empty_optimizer_state()

    def load_optimizer_state(self, state, step: int) -> None:
        self.engine.load_optimizer_state(state, step)


def build_engine(cfg: JobConfig):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cfg.parallel_sizes.world == 1 and cfg.parallel.vpp == 1:
        return SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed)
    return DistributedEngine(cfg)


def _layout(cfg: JobConfig) -> dict:
    return {"pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "ep": cfg.parallel.ep,
            "dp": cfg.parallel.dp, "encoder": cfg.parallel.encoder,
            "world": int(os.environ.get("WORLD_SIZE", "1"))}


def resume_step(cfg: JobConfig, engine, checkpoints: CheckpointManager) -> int:
    """Load the checkpoint `--resume` names into the engine; return the step to continue at."""
    path = checkpoints.resolve(cfg.resume)
    if path is None:
        return 0
    meta = checkpoints.read_meta(path, to_dict(cfg)["model"])
    optimizer = engine.empty_optimizer_state()
    checkpoints.load(path, engine.named_tensors(), optimizer,
                     same_world=meta["layout"]["world"] == _layout(cfg)["world"])
    engine.load_optimizer_state(optimizer, meta["step"])
    return int(meta["step"])


def write_step_profile(cfg: JobConfig, engine, t0: float, out_dir: Path, rank: int) -> None:
    """Gather this step's spans from every rank; rank 0 writes the trace, Gantt and table."""
    if not isinstance(engine, DistributedEngine):
        print("profile: the single-process engine has no pipeline to profile; "
              "launch with torchrun and parallel.pp > 1", flush=True)
        return
    topo = engine.topology
    mine = (step_spans(topo.rank, engine.engine.runtime.timeline, engine.engine.phases, t0),
            RankInfo(topo.rank, topo.pp_rank, topo.dp_rank), peak_memory_bytes())
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        p = cfg.parallel
        title = (f"step {cfg.profile.step}: pp={p.pp} vpp={p.vpp} ep={p.ep} dp={p.dp} "
                 f"encoder={p.encoder}, {cfg.microbatches_per_replica} microbatches")
        print(write_profile(out_dir, [g[0] for g in gathered], [g[1] for g in gathered],
                            [g[2] for g in gathered], pp=p.pp, vpp=p.vpp,
                            microbatches=cfg.microbatches_per_replica, title=title), flush=True)


class StopRequest:
    """Set by SIGTERM/SIGINT (see launch.train): finish the step, checkpoint, exit cleanly."""

    requested = False


def _stop_agreed() -> bool:
    """Every rank must stop after the same step, whichever rank saw the signal."""
    flag = torch.tensor(1.0 if StopRequest.requested else 0.0)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def train(cfg: JobConfig, rank: int = 0, engine=None) -> list[dict]:
    """Run from the resumed step (or 0) to `cfg.train.steps`; return the metric records."""
    run_dir = Path(cfg.job.run_dir)
    is_logger = rank == 0
    if is_logger:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    torch.manual_seed(cfg.train.seed)
    data = synthetic_data(cfg)
    engine = engine or build_engine(cfg)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
    start = resume_step(cfg, engine, checkpoints)
    metrics = MetricsWriter(run_dir, is_logger, cfg.job.log_every, first_step=start)
    records = []
    tensorboard = TensorBoardWriter(run_dir, is_logger and cfg.job.tensorboard)
    peak_tflops = device_peak_tflops()
    for step in range(start, cfg.train.steps):
        fetch_start = time.perf_counter()
        batch = data.global_batch(step, cfg.train.global_batch)
        batch.validate(cfg.model.media_token_id)
        data_wait = time.perf_counter() - fetch_start
        lr = learning_rate(step, cfg.optim, cfg.train.steps)
        profiling = cfg.profile.enabled and step == cfg.profile.step
        if profiling and dist.is_initialized():
            dist.barrier()  # one time origin for all ranks
        t0 = time.perf_counter()
        with torch_profiler_trace(profiling and cfg.profile.torch_profiler,
                                  run_dir / "profile" / "torch", rank):
            loss, grad_norm = engine.step(batch, lr)
        elapsed = time.perf_counter() - t0
        if profiling:
            write_step_profile(cfg, engine, t0, run_dir / "profile", rank)
        tokens = batch.tokens.numel()
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                  "tokens": tokens, "loss_tokens": batch.num_loss_tokens(),
                  "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                  "data_wait_s": data_wait, **engine.stats}
        if is_logger:  # achieved model TFLOP/s per rank (and MFU on a known GPU)
            flops = model_flops(cfg.model, batch.doc_ids, [m.grid_thw for m in batch.media])
            world = dist.get_world_size() if dist.is_initialized() else 1
            record.update(throughput_metrics(flops / world, elapsed, peak_tflops))
        metrics.write(record, total_steps=cfg.train.steps)
        tensorboard.write(record)
        records.append(record)
        done = step + 1
        stop = _stop_agreed()
        if cfg.checkpoint.interval and (done % cfg.checkpoint.interval == 0 or stop
                                        or done == cfg.train.steps):
            checkpoints.save(done, engine.named_tensors(), engine.optimizer_state(),
                             {"model": to_dict(cfg)["model"], "layout": _layout(cfg)})
        if stop:
            if is_logger:
                print(f"stopped on request after step {step}; resume with --resume auto",
                      flush=True)
            break
    metrics.close()
    tensorboard.close()
    return records
