"""The step loop: data -> engine step -> metrics, the same whatever the parallel layout.

One process (world size 1, every parallel size 1) uses the plain reference
engine; anything else uses the parallel engine over torch.distributed. Every
rank gets its data-parallel replica's rows of the step from the data source
(trainer/data.py); with one replica those are the whole global batch.
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from dataloader.batch import Batch
from trainer.batch_inputs import model_inputs
from trainer.checkpoint import CheckpointManager, CorruptCheckpoint
from trainer.config import JobConfig, to_dict
from trainer.data import build_data
from trainer.lr_schedule import learning_rate
from model.flops import model_flops
from trainer.flops import device_peak_tflops, throughput_metrics
from trainer.metrics import MetricsWriter
from trainer.tensorboard import TensorBoardWriter
from trainer.profile import (RankInfo, peak_memory_bytes, step_spans, torch_profiler_trace,
                             write_profile)
from trainer.single_process import SingleProcessEngine


def microbatches_of(batch: Batch, micro_batch: int) -> list[Batch]:
    return [batch.rows(start, start + micro_batch)
            for start in range(0, batch.num_rows, micro_batch)]


def replica_media(microbatches: list[Batch], dp_rank: int):
    """DEP's view of one replica's media: metadata per item, and its pixels."""
    from parallel.dep import ReplicaMedia
    from parallel.dep_plan import MediaRef

    items = [(mb, m) for mb, batch in enumerate(microbatches) for m in batch.media]
    return ReplicaMedia(
        refs=[MediaRef(item_id=m.item_id, replica=dp_rank, microbatch=mb,
                       num_patches=m.num_patches, num_tokens=m.num_tokens) for mb, m in items],
        grids={m.item_id: m.grid_thw for _, m in items},
        patches={m.item_id: m.patches for _, m in items})


class DistributedEngine:
    """The parallel engine and its process groups (only for world size > 1)."""

    def __init__(self, cfg: JobConfig):
        from parallel.engine import ParallelEngine
        from parallel.topology import Topology, init_distributed

        init_distributed("gloo")
        self.topology = Topology(cfg.parallel_sizes)
        p = cfg.parallel
        self.engine = ParallelEngine(
            cfg.model, self.topology, cfg.pipeline_layout(), micro_batch=cfg.train.micro_batch, seq_len=cfg.data.seq_len,
            microbatches=cfg.microbatches_per_replica, seed=cfg.train.seed,
            rule=cfg.optim.update_rule(), grad_clip=cfg.optim.grad_clip, encoder=p.encoder,
            dtype=cfg.dtype, bucket_numel=p.bucket_numel,
            overlap_grad_reduce=p.overlap_grad_reduce,
            matrix_rule=cfg.optim.matrix_rule(cfg.model.lm))
        self.cfg = cfg

    @property
    def stats(self) -> dict[str, float]:
        return self.engine.stats

    def step(self, batch: Batch, lr: float) -> tuple[float, float]:
        """One step on this replica's rows `batch`."""
        mbs = microbatches_of(batch, self.cfg.train.micro_batch)
        if self.cfg.parallel.encoder == "dep":
            return self.engine.step([model_inputs(b, with_patches=False) for b in mbs], lr,
                                    media=replica_media(mbs, self.topology.dp_rank),
                                    media_ids=[[m.item_id for m in b.media] for b in mbs])
        return self.engine.step([model_inputs(b) for b in mbs], lr)

    # checkpoint state: what this rank holds, by global name
    def named_tensors(self):
        return self.engine.named_tensors()

    def checkpoint_state(self):
        return self.engine.checkpoint_state()

    def checkpoint_targets(self, saved: set[str]):
        return self.engine.checkpoint_targets(saved)

    def finish_load(self, step: int) -> None:
        self.engine.finish_load(step)


def build_engine(cfg: JobConfig):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and cfg.parallel_sizes.world == 1 and cfg.parallel.vpp == 1:
        return SingleProcessEngine(cfg.model, cfg.optim, cfg.train.micro_batch, cfg.train.seed,
                                   dtype=cfg.dtype)
    return DistributedEngine(cfg)


def _layout(cfg: JobConfig) -> dict:
    return {"pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "ep": cfg.parallel.ep,
            "dp": cfg.parallel.dp, "encoder": cfg.parallel.encoder,
            "world": int(os.environ.get("WORLD_SIZE", "1"))}


def resume_step(cfg: JobConfig, engine, data, checkpoints: CheckpointManager) -> int:
    """Load the checkpoint `--resume` names into the engine and the data source; return the
    step to continue at (0 for a fresh start). With `--resume auto`, a checkpoint whose
    files turn out damaged while loading is skipped for the next older one."""
    skip: set[Path] = set()
    while (path := checkpoints.resolve(cfg.resume, skip)) is not None:
        try:
            meta = checkpoints.read_meta(path, to_dict(cfg)["model"])
            model, optimizer = engine.checkpoint_targets(checkpoints.saved_keys(path))
            checked = checkpoints.load(path, model, optimizer,
                                       same_world=meta["layout"]["world"] == _layout(cfg)["world"])
        except CorruptCheckpoint as e:
            if cfg.resume != "auto":
                raise
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
            skip.add(path)
            continue
        engine.finish_load(meta["step"])
        data.load_state_dict(meta["data"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        shown = " ".join(checked[:8]) + (" ..." if len(checked) > 8 else "")
        print(f"rank {rank}: resumed from {path} at step {meta['step']}; checked the "
              f"{len(checked)} checkpoint files this rank read: {shown}", flush=True)
        return int(meta["step"])
    return 0


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
    engine = engine or build_engine(cfg)
    dp_rank = engine.topology.dp_rank if isinstance(engine, DistributedEngine) else 0
    data = build_data(cfg, dp_rank, cfg.parallel.dp)
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
    start = resume_step(cfg, engine, data, checkpoints)
    metrics = MetricsWriter(run_dir, is_logger, cfg.job.log_every, first_step=start)
    records = []
    tensorboard = TensorBoardWriter(run_dir, is_logger and cfg.job.tensorboard)
    peak_tflops = device_peak_tflops()
    for step in range(start, cfg.train.steps):
        fetch_start = time.perf_counter()
        batch = data.next_batch()  # this replica's rows
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
        tokens = cfg.train.global_batch * cfg.data.seq_len
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                  "tokens": tokens, "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                  "data_wait_s": data_wait, **engine.stats}
        if is_logger:  # achieved model TFLOP/s per rank (and MFU on a known GPU); the replica's
            # FLOPs times dp estimates the global batch's
            flops = model_flops(cfg.model, batch.doc_ids, [m.grid_thw for m in batch.media])
            world = dist.get_world_size() if dist.is_initialized() else 1
            record.update(throughput_metrics(flops * cfg.parallel.dp / world, elapsed,
                                             peak_tflops))
        metrics.write(record, total_steps=cfg.train.steps)
        tensorboard.write(record)
        records.append(record)
        done = step + 1
        stop = _stop_agreed()
        if stop or (cfg.checkpoint.interval and (done % cfg.checkpoint.interval == 0
                                                 or done == cfg.train.steps)):
            checkpoints.save(done, *engine.checkpoint_state(),
                             {"model": to_dict(cfg)["model"], "layout": _layout(cfg),
                              "data": data.state_dict()})
        if stop:
            if is_logger:
                print(f"stopped on request after step {step}; resume with --resume auto",
                      flush=True)
            break
    metrics.close()
    tensorboard.close()
    data.close()
    return records
