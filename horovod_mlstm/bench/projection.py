"""Projections to hardware this project has not run on: the gradient allreduce on the paper's cluster
(16 DGX-1 nodes), and a GPU's training rate from the step's measured share of the CPU's matmul rate.

Both are formulas over the published figures of figures.py and measured quantities (gradient
bytes, FLOPs per character, a share of a matmul limit); nothing here is a measurement, and every
table that prints them says "projection".
"""

from __future__ import annotations

from horovod_mlstm.bench import figures
from horovod_mlstm.model import flops_per_char

NODES = int(figures.PAPER_GPUS.value // figures.DGX1_GPUS.value)  # 16 DGX-1 nodes
GPUS_PER_NODE = int(figures.DGX1_GPUS.value)


def ring_seconds(nbytes: float, ranks: int, bytes_per_s: float) -> float:
    """Bandwidth term of a ring allreduce: each rank sends and receives 2(N-1)/N of the buffer."""
    return 2 * (ranks - 1) / ranks * nbytes / bytes_per_s


def allreduce_projection(nbytes: float) -> dict:
    """Seconds to allreduce `nbytes` on 16 DGX-1 nodes, from the stated bandwidths (latency ignored).

    flat_one_ring: one ring through all 128 GPUs; it leaves each node on one 100 Gb/s adapter.
    flat_four_rings: four rings, a quarter of the buffer each, one per adapter (what NCCL does).
    hierarchical: reduce-scatter over NVLink in each node, 8 allreduces of 1/8 of the buffer across
    the 16 nodes sharing the node's four adapters, allgather over NVLink (HOROVOD_HIERARCHICAL_ALLREDUCE).
    """
    ranks, inter = NODES * GPUS_PER_NODE, figures.DGX1_INFINIBAND.value
    intra = 2 * (GPUS_PER_NODE - 1) / GPUS_PER_NODE * nbytes / figures.V100_NVLINK.value
    across = ring_seconds(nbytes / GPUS_PER_NODE, NODES, inter / GPUS_PER_NODE)
    return {"flat_one_ring": ring_seconds(nbytes, ranks, inter / 4),
            "flat_four_rings": ring_seconds(nbytes, ranks, inter),
            "hierarchical": intra + across, "hierarchical_nvlink_part": intra, "hierarchical_infiniband_part": across}


def gpu_projection(hidden: int, share_of_peak: float) -> dict:
    """Training chars/s per GPU if the GPU's kernels reached `share_of_peak` of its peak matmul rate,
    as the project's step reaches that share of the CPU's matmul limit; and the paper's own rate per
    V100 with the share of the V100's peak it implies. A share above 1 (the step's weight-gradient
    products run faster than the skinny chained limit) counts as 1: no GPU runs above its peak."""
    flops = flops_per_char(hidden)
    paper_per_gpu = figures.PAPER_CHARS_PER_S.value / figures.PAPER_GPUS.value
    share_of_peak = min(share_of_peak, 1.0)
    return {"hidden": hidden, "flops_per_char": flops, "share_of_peak": share_of_peak,
            "paper_chars_per_s_per_v100": paper_per_gpu,
            "paper_share_of_v100_peak": paper_per_gpu * flops / figures.V100_FP16_TENSOR.value,
            "v100_chars_per_s": share_of_peak * figures.V100_FP16_TENSOR.value / flops,
            "h100_chars_per_s": share_of_peak * figures.H100_BF16_DENSE.value / flops}
