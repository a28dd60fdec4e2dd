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

from dataloader.batch import Batch, MediaItem, normalize_patches
from model.config import ConfigError
from trainer.batch_inputs import model_inputs
from trainer.checkpoint import CheckpointManager, CorruptCheckpoint
from trainer.config import JobConfig, to_dict
from trainer.data import DataRole, build_data, job_data_state
from trainer.device import backend_for, resolve_device
from trainer.lr_schedule import learning_rate
from model.flops import model_flops
from trainer.flops import device_peak_tflops, throughput_metrics
from trainer.init_from import is_weights_only, load_weights
from trainer.metrics import MetricsWriter
from trainer.tensorboard import TensorBoardWriter
from trainer.profile import (RankInfo, peak_memory_bytes, step_spans, torch_profiler_trace,
                             write_profile)
from trainer.single_process import SingleProcessEngine


def microbatches_of(batch: Batch, micro_batch: int) -> list[Batch]:
    return [batch.rows(start, start + micro_batch)
            for start in range(0, batch.num_rows, micro_batch)]


class DistributedEngine:
    """The parallel engine and its process groups (only for world size > 1)."""

    def __init__(self, cfg: JobConfig):
        from parallel.engine import ParallelEngine
        from parallel.topology import Topology, init_distributed

        device = resolve_device(cfg.job.device)
        init_distributed(backend_for(device), timeout_s=cfg.job.collective_timeout_s)
        self.topology = Topology(cfg.parallel_sizes, timeout_s=cfg.job.collective_timeout_s,
                                 dep_group_replicas=cfg.parallel.dep_group_replicas)
        self.device = device
        p = cfg.parallel
        self.engine = ParallelEngine(
            cfg.model, self.topology, cfg.pipeline_layout(), micro_batch=cfg.train.micro_batch,
            seq_len=cfg.data.seq_len, microbatches=cfg.microbatches_per_replica,
            seed=cfg.train.seed, device=device,
            rule=cfg.optim.update_rule(), grad_clip=cfg.optim.grad_clip, encoder=p.encoder,
            dtype=cfg.dtype, bucket_numel=p.bucket_numel,
            overlap_grad_reduce=p.overlap_grad_reduce, ep_overlap=p.ep_overlap,
            matrix_rule=cfg.optim.matrix_rule(cfg.model.lm),
            memory_policy=cfg.memory.to_policy())
        self.cfg = cfg

    @property
    def stats(self) -> dict[str, float]:
        return self.engine.stats

    def data_role(self) -> DataRole:
        """What this rank needs from the data: colocated, pixels on stage 0 only; DEP, the
        group's media metadata and the pixels of the items the DEP plan assigns here."""
        topo = self.topology
        if self.cfg.parallel.encoder == "colocated":
            return DataRole(topo.dp_rank, topo.sizes.dp, "own" if topo.is_first_stage else "none")
        return DataRole(topo.dp_rank, topo.sizes.dp, self._dep_items_to_decode, tuple(topo.dep_replicas))

    def _dep_refs(self, items: list[tuple[int, MediaItem]]):
        """DEP's metadata of the group's media: refs (replica = index in the group) and grids."""
        from parallel.dep_plan import MediaRef

        first, micro = self.topology.dep_replicas[0], self.cfg.train.micro_batch
        refs = [MediaRef(m.item_id, replica - first, m.row // micro, m.num_patches, m.num_tokens)
                for replica, m in items]
        return refs, {m.item_id: m.grid_thw for _, m in items}

    def _dep_items_to_decode(self, step: int, items: list[tuple[int, MediaItem]]) -> list[int]:
        """The loader's selection: what the DEP plan of this step gives this rank to encode.
        Called when the loader plans the step (ahead), so the pixels are decoded in time;
        the engine rebuilds the same plan and checks it across ranks."""
        from parallel.dep_plan import plan_media

        topo = self.topology
        plan = plan_media(self._dep_refs(items)[0], dist.get_world_size(topo.dep_group), topo.dep_stage0_ranks)
        return [m.item_id for m in plan.items_encoded_by(dist.get_rank(topo.dep_group))]

    def step(self, batch: Batch, lr: float) -> tuple[float, float]:
        """One step on this replica's rows `batch`."""
        mbs = microbatches_of(batch, self.cfg.train.micro_batch)
        if self.cfg.parallel.encoder == "dep":
            from parallel.dep import StepMedia

            group = batch.group
            refs, grids = self._dep_refs(group.items)

            def fetch(mine) -> list[torch.Tensor]:
                missing = [m.item_id for m in mine if m.item_id not in group.pixels]
                if missing:
                    raise RuntimeError(f"DEP plans media items {missing[:8]} on this rank but its loader "
                                       "did not decode them: the loader's selection and the plan differ")
                # uint8 to the device, float there
                return [normalize_patches(group.pixels[m.item_id].to(self.device)) for m in mine]

            return self.engine.step([model_inputs(b, with_patches=False, device=self.device) for b in mbs], lr,
                                    media=StepMedia(refs, grids, fetch, group.rows_digest),
                                    media_ids=[[m.item_id for m in b.media] for b in mbs])
        # Known limit (colocated): stage 0 moves and normalises every microbatch's pixels before
        # the step and holds them on the device through it (2.3 GiB at K2.5's layout, by the
        # planner); doing it per microbatch, when its forward starts, would cut that.
        return self.engine.step([model_inputs(b, with_patches=self.topology.is_first_stage,
                                              device=self.device)
                                 for b in mbs], lr)

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
                                   dtype=cfg.dtype, device=resolve_device(cfg.job.device),
                                   memory_policy=cfg.memory.to_policy())
    return DistributedEngine(cfg)


def _layout(cfg: JobConfig) -> dict:
    return {"pp": cfg.parallel.pp, "vpp": cfg.parallel.vpp, "ep": cfg.parallel.ep,
            "dp": cfg.parallel.dp, "encoder": cfg.parallel.encoder,
            "world": int(os.environ.get("WORLD_SIZE", "1"))}


def resume_step(cfg: JobConfig, engine, data, checkpoints: CheckpointManager) -> int:
    """Load the checkpoint `--resume` names into the engine and the data source; return the
    step to continue at (0 for a fresh start, or `--init_from`'s weights). With
    `--resume auto`, a checkpoint whose files turn out damaged while loading is skipped for
    the next older one."""
    skip: set[Path] = set()
    while (path := checkpoints.resolve(cfg.resume, skip)) is not None:
        if is_weights_only(path):
            raise ConfigError(f"--resume {cfg.resume}: {path} holds model weights only (written "
                              f"by launch.convert import): start from it with --init_from {path}")
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
    if cfg.init_from:
        # the weights a load writes (with bf16: fp32 copies that become the masters), seeded
        # first so that names the import lacks keep their initialisation
        targets, _ = engine.checkpoint_targets(set())
        current = engine.named_tensors()
        for name, target in targets.items():
            if target.data_ptr() != current[name].data_ptr():
                target.copy_(current[name])
        fresh = load_weights(cfg.init_from, targets, to_dict(cfg)["model"])
        engine.finish_load(0)
        if not dist.is_initialized() or dist.get_rank() == 0:
            print(f"starting from the weights of {cfg.init_from} (step 0, fresh optimizer and "
                  f"data order); {len(fresh)} tensors it lacks keep their seeded "
                  f"initialisation{': ' + ', '.join(fresh[:3]) + ' ...' if fresh else ''}",
                  flush=True)
    return 0


def write_step_profile(cfg: JobConfig, engine, t0: float, out_dir: Path, rank: int) -> None:
    """Gather this step's spans from every rank; rank 0 writes the trace, Gantt and table."""
    if not isinstance(engine, DistributedEngine):
        print("profile: the single-process engine has no pipeline to profile; "
              "launch with torchrun and parallel.pp > 1", flush=True)
        return
    topo = engine.topology
    memory = engine.engine.memory
    mine = (step_spans(topo.rank, engine.engine.runtime.timeline, engine.engine.phases, t0),
            RankInfo(topo.rank, topo.pp_rank, topo.dp_rank), peak_memory_bytes(),
            (memory.peak["device"], memory.peak["host"]) if memory is not None else (0, 0))
    gathered = [None] * dist.get_world_size() if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    if rank == 0:
        p = cfg.parallel
        title = (f"step {cfg.profile.step}: pp={p.pp} vpp={p.vpp} ep={p.ep} dp={p.dp} "
                 f"encoder={p.encoder}, {cfg.microbatches_per_replica} microbatches")
        print(write_profile(out_dir, [g[0] for g in gathered], [g[1] for g in gathered],
                            [g[2] for g in gathered], pp=p.pp, vpp=p.vpp,
                            microbatches=cfg.microbatches_per_replica, title=title,
                            activations=[g[3] for g in gathered]), flush=True)


class StopRequest:
    """Set by SIGTERM/SIGINT or the loss of the torchrun agent (see launch.train): finish the
    step, checkpoint, exit cleanly."""

    requested = False


def _stop_agreed(device: torch.device) -> bool:
    """Every rank must stop after the same step, whichever rank saw the signal."""
    flag = torch.tensor(1.0 if StopRequest.requested else 0.0, device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)


def train(cfg: JobConfig, rank: int = 0, engine=None, progress=None) -> list[dict]:
    """Run from the resumed step (or 0) to `cfg.train.steps`; return the metric records.

    `progress(what, timed=True)` is told what the rank is about to do (trainer/watchdog.py)."""
    progress = progress or (lambda what, timed=True: None)
    run_dir = Path(cfg.job.run_dir)
    is_logger = rank == 0
    torch.manual_seed(cfg.train.seed)
    progress("start-up: building the model and the process groups", timed=False)
    engine = engine or build_engine(cfg)
    distributed = isinstance(engine, DistributedEngine)
    progress("start-up: opening the data", timed=False)
    data = build_data(cfg, engine.data_role() if distributed else DataRole())
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
    progress(f"start-up: resuming ({cfg.resume})", timed=False)
    start = resume_step(cfg, engine, data, checkpoints)
    if is_logger:  # only now: a refused resume leaves the previous run's config in place
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    metrics = MetricsWriter(run_dir, is_logger, cfg.job.log_every, first_step=start)
    records = []
    tensorboard = TensorBoardWriter(run_dir, is_logger and cfg.job.tensorboard)
    peak_tflops = device_peak_tflops()
    for step in range(start, cfg.train.steps):
        progress(f"step {step}: reading data")
        fetch_start = time.perf_counter()
        batch = data.next_batch()  # this replica's rows
        batch.validate(cfg.model.media_token_id)
        data_wait = time.perf_counter() - fetch_start
        lr = learning_rate(step, cfg.optim, cfg.train.steps)
        profiling = cfg.profile.enabled and step == cfg.profile.step
        progress(f"step {step}: forward, backward and optimizer (collectives with other ranks)")
        if profiling and dist.is_initialized():
            dist.barrier()  # one time origin for all ranks
        t0 = time.perf_counter()
        with torch_profiler_trace(profiling and cfg.profile.torch_profiler,
                                  run_dir / "profile" / "torch", rank):
            loss, grad_norm = engine.step(batch, lr)
        elapsed = time.perf_counter() - t0
        if profiling:
            progress(f"step {step}: gathering the profile")
            write_step_profile(cfg, engine, t0, run_dir / "profile", rank)
        tokens = cfg.train.global_batch * cfg.data.seq_len
        record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr,
                  "tokens": tokens, "step_time_s": elapsed, "tokens_per_s": tokens / elapsed,
                  "data_wait_s": data_wait, "peak_memory_bytes": peak_memory_bytes(),
                  **engine.stats}
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
        progress(f"step {step}: agreeing whether to stop")
        stop = _stop_agreed(engine.device)
        if stop or (cfg.checkpoint.interval and (done % cfg.checkpoint.interval == 0
                                                 or done == cfg.train.steps)):
            progress(f"step {step}: saving the step-{done} checkpoint")
            data_state = job_data_state(data, not distributed or engine.topology.is_first_stage)
            checkpoints.save(done, *engine.checkpoint_state(),
                             {"model": to_dict(cfg)["model"], "layout": _layout(cfg),
                              "data": data_state})
        if stop:
            if is_logger:
                print(f"stopped on request after step {step}; resume with --resume auto",
                      flush=True)
            break
    progress("closing", timed=False)
    metrics.close()
    tensorboard.close()
    data.close()
    return records
