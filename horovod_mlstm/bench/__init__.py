"""The benchmark harness, one module per job (`python -m horovod_mlstm.bench`; flags in __main__.py).

    step.py        the machine's chained matmul limit, the project's training step against it and
                   against the plain Keras mLSTMs of baselines.py
    scaling.py     1 -> 2 processes with real train.py jobs (Gloo, MPI, independent)
    inputs.py      the input pipeline's and preprocessing's rates
    profile.py     where the step's time goes, by kind of op (--profile)
    capacity.py    the paper's per-rank shape: measured memory, the fit, capacity tables (--paper)
    projection.py  allreduce on 16 DGX-1 nodes and a GPU's rate: projections from figures.py's
                   published hardware figures, never measurements
    report.py      the Markdown tables, and the generated page docs/benchmarks.md

Every result records the machine it came from and the precision it would choose (hardware.py).
"""
