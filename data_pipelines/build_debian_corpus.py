"""Command line: build the Debian translations corpus into the cache.

  python -m data_pipelines.build_debian_corpus --target_lang=fr \
      [--cache_dir=~/.cache/moe_keras/debian_translations] \
      [--lists_dir=/var/lib/apt/lists] [--rebuild]

Without --lists_dir this runs `apt-get update` (as root) into the cache; see
`data_pipelines.debian_translations`.
"""

from typing import Sequence

from absl import app
from absl import flags
from absl import logging

from data_pipelines import debian_translations

FLAGS = flags.FLAGS
flags.DEFINE_string(
    "cache_dir", debian_translations.DEFAULT_CACHE_DIR, "Corpus cache."
)
flags.DEFINE_string("target_lang", "fr", "Foreign language (fr, de, ...).")
flags.DEFINE_string("lists_dir", None, "Existing apt lists directory.")
flags.DEFINE_bool("rebuild", False, "Rebuild even if the corpus is cached.")


def main(argv: Sequence[str]) -> None:
  del argv
  logging.set_verbosity(logging.INFO)
  result = debian_translations.build_debian_translations(
      FLAGS.cache_dir,
      source_lang="en",
      target_lang=FLAGS.target_lang,
      lists_dir=FLAGS.lists_dir,
      rebuild=FLAGS.rebuild,
  )
  for split, path in result.files.items():
    print(f'{split}: {path} ({result.counts[f"{split}_pairs"]} pairs)')


if __name__ == "__main__":
  app.run(main)
