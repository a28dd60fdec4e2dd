"""The GPUs the planner knows (`launch.plan --gpu`): one table, every number with its source.

Bandwidths are per GPU and per direction, from the data sheets: what a link can carry,
not what a collective achieves (DeepSeek-V3, sec. 3.2.2, works with 160 GB/s of the
H800's 200 GB/s NVLink and 50 GB/s of InfiniBand). `network` is the GPU's share of the
node's scale-out fabric: 8 x 400 Gbit/s NICs per 8-GPU node, the K2.5 report's H800
clusters (Appendix C: 8 x 400 Gbps RoCE) and NVIDIA's DGX/HGX reference designs.

    GPU    dense bf16    HBM (usable, nvidia-smi)    HBM bandwidth   NVLink    network
    H800   989 TFLOP/s   81,559 MiB = 79.6 GiB        3.35 TB/s       200 GB/s  50 GB/s
    H100   989 TFLOP/s   81,559 MiB = 79.6 GiB        3.35 TB/s       450 GB/s  50 GB/s
    H200   989 TFLOP/s   143,771 MiB = 140.4 GiB      4.8 TB/s        450 GB/s  50 GB/s

Sources: NVIDIA H100 Tensor Core GPU data sheet (SXM5: 989.4 TFLOP/s bf16 dense, i.e.
1,979 with sparsity; 80 GB HBM3 at 3.35 TB/s; NVLink 900 GB/s bidirectional); NVIDIA H800
SXM5 (the H100 die and memory with NVLink cut to 400 GB/s bidirectional, the export
variant the K2.5 report trains on); NVIDIA H200 data sheet (141 GB HBM3e at 4.8 TB/s,
same compute and NVLink as the H100 SXM). Usable memory is what `nvidia-smi` reports
for the 80 GB and 141 GB parts.
"""
from __future__ import annotations

from dataclasses import dataclass

MIB = 1 << 20


@dataclass(frozen=True)
class GPU:
    name: str
    peak_bf16_tflops: float  # dense tensor-core peak, no sparsity
    memory_bytes: int  # usable HBM
    hbm_tb_per_s: float
    nvlink_gb_per_s: float  # per GPU, per direction
    network_gb_per_s: float  # per GPU, per direction, to other nodes
    gpus_per_node: int = 8


GPUS: dict[str, GPU] = {
    "h800": GPU("H800 SXM", 989.0, 81_559 * MIB, 3.35, 200.0, 50.0),
    "h100": GPU("H100 SXM", 989.0, 81_559 * MIB, 3.35, 450.0, 50.0),
    "h200": GPU("H200 SXM", 989.0, 143_771 * MIB, 4.8, 450.0, 50.0),
}
