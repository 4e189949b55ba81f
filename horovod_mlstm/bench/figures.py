"""Published figures of hardware this project was not run on, each with where it comes from.

The capacity tables and the projections compare what was measured here with the paper's cluster
(16 DGX-1 nodes of 8 V100s) and with newer GPUs. Those figures are vendors' and the paper's stated
numbers, not measurements: each carries its source, and the tables that use them say so.
"""

from __future__ import annotations

import dataclasses

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Figure:
    value: float
    unit: str
    source: str


# The paper: Puri et al. 2018, "Large Scale Language Modeling: Converging on 40GB of Text in Four Hours".
PAPER_GPUS = Figure(128, "V100 GPUs", "Puri et al. 2018, abstract: 128 NVIDIA Tesla V100 GPUs")
PAPER_CHARS_PER_S = Figure(3 * 40e9 / (4 * 3600), "characters (bytes) per second, whole job",
                           "Puri et al. 2018, abstract: 3 epochs of the 40 GB Amazon Reviews dataset in four hours")

# The cluster: NVIDIA DGX-1 with V100 (datasheet).
DGX1_GPUS = Figure(8, "V100 GPUs per node", "NVIDIA DGX-1 datasheet: 8x Tesla V100")
DGX1_INFINIBAND = Figure(4 * 100e9 / 8, "bytes/s per node, each direction",
                         "NVIDIA DGX-1 datasheet: 4x InfiniBand EDR 100 Gb/s adapters")
V100_NVLINK = Figure(6 * 25e9, "bytes/s per GPU, each direction",
                     "NVIDIA Tesla V100 datasheet: NVLink 300 GB/s, i.e. six NVLink 2.0 links of 25 GB/s each way")

# Peak matmul rates for the GPU projection (dense, no sparsity).
V100_FP16_TENSOR = Figure(125e12, "FLOP/s", "NVIDIA Tesla V100 datasheet (SXM2): 125 TFLOPS tensor performance")
H100_BF16_DENSE = Figure(989e12, "FLOP/s", "NVIDIA H100 datasheet (SXM): 1,979 TFLOPS bf16 with sparsity, half without")

# Device memory the capacity table checks a rank's need against (what a process gets is ~1 GiB less:
# the CUDA context and library workspaces, which the table does not count).
DEVICE_MEMORY = {
    "V100 16 GB": Figure(16 * GIB, "bytes", "NVIDIA Tesla V100 datasheet: 16 GB HBM2"),
    "V100 32 GB": Figure(32 * GIB, "bytes", "NVIDIA Tesla V100 datasheet: 32 GB HBM2"),
    "H100 80 GB": Figure(80 * GIB, "bytes", "NVIDIA H100 datasheet (SXM): 80 GB HBM3"),
}


def sources() -> list[str]:
    """One line per figure used, for the notes under a table."""
    every = [PAPER_GPUS, PAPER_CHARS_PER_S, DGX1_GPUS, DGX1_INFINIBAND, V100_NVLINK, V100_FP16_TENSOR,
             H100_BF16_DENSE, *DEVICE_MEMORY.values()]
    return [f.source for f in every]
