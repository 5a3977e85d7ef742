"""The language-model corpora of the results grids.

One definition for `lm_results.py` (TensorFlow, this machine) and
`lm_gpu.py` (JAX, the device): where a corpus's gin configs live, which gin
parameter a run's seed sets (the order of the training batches), and which
files identify a build of the corpus (`results_lib.corpus_build`).
"""

from benchmarks import results_lib

CORPORA = {
    "ptb": results_lib.Corpus(
        name="ptb", gin_dir="gin/lm/ptb", data_seed_binding="lm_batching.seed"
    ),
    "debian_docs": results_lib.Corpus(
        name="debian_docs",
        gin_dir="gin/lm/debian_docs",
        data_seed_binding="lm_batching.seed",
        build_files=("~/.cache/moe_keras/debian_docs/manifest.json",),
    ),
}
