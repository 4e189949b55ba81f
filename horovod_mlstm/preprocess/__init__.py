"""Review files -> cleaned, framed documents -> train/val/test TFRecord shards + manifest.json.

    python -m horovod_mlstm.preprocess --input reviews/*.json.gz --output_dir data/amazon --num_shards 128
    mpirun -np 16 python -m horovod_mlstm.preprocess ...   (or launch/preprocess.sh --hostfile H ...)

Each document is cleaned as the reference implementations did (records.clean), encoded as UTF-8
and framed with records.DOC_END so the model sees where reviews end. The split and the shard of
a document are a stable hash of its bytes, so rerunning gives the same split and adding input
files moves no old review. Each chunk of the input becomes one file of its records grouped by
(split, shard), and a shard is its chunks' groups concatenated in input order (TFRecord files
concatenate), which is exactly what one sequential pass writes: the output is the same whatever
the number of --workers (processes per rank) and MPI ranks.

The modules, bottom up: settings (options and their check), formats (records of a byte stream),
chunks (planning and readers), world (ranks, progress, signals), worker (a chunk -> a staging
file; the pool), outcome (what a pass means: fail, rerun or the manifest), pipeline (the run),
__main__ (the flags).
"""

from horovod_mlstm.preprocess.formats import parse_review
from horovod_mlstm.preprocess.pipeline import preprocess
from horovod_mlstm.preprocess.settings import PreprocessError

__all__ = ["PreprocessError", "parse_review", "preprocess"]
