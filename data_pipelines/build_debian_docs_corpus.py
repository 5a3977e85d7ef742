"""Command line: build the Debian documentation LM corpus into the cache.

  python -m data_pipelines.build_debian_docs_corpus \
      [--cache_dir=~/.cache/moe_keras/debian_docs] [--rebuild] \
      [--include_descriptions]

Downloads the packages of `debian_docs.DEFAULT_PACKAGES` with
`apt-get download` (no root needed unless --include_descriptions, which runs
`apt-get update` into the cache) and writes train/valid/test.txt, vocab.txt
and manifest.json; see `data_pipelines.debian_docs`.
"""

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from data_pipelines import debian_docs
from data_pipelines.errors import DataError

FLAGS = flags.FLAGS
flags.DEFINE_string("cache_dir", debian_docs.DEFAULT_CACHE_DIR, "Corpus cache.")
flags.DEFINE_bool("rebuild", False, "Rebuild even if the corpus is cached.")
flags.DEFINE_bool(
    "include_descriptions",
    False,
    "Also add the English package descriptions (Translation-en).",
)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  try:
    result = debian_docs.build_debian_docs(
        FLAGS.cache_dir,
        include_descriptions=FLAGS.include_descriptions,
        rebuild=FLAGS.rebuild,
    )
  except DataError as e:
    raise SystemExit(f"build_debian_docs_corpus: {e}") from None
  splits = result.manifest["splits"]
  for split, path in result.files.items():
    print(
        f"{split}: {path} ({splits[split]['words']} words,"
        f" {splits[split]['sentences']} sentences,"
        f" OOV {100 * splits[split]['oov_rate']:.2f}%)"
    )
  print(f"vocab: {result.vocab_file} ({result.manifest['vocab_size']} entries)")


if __name__ == "__main__":
  app.run(main)
