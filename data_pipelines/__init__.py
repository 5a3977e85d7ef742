"""tf.data input pipelines for the Sparsely-Gated Mixture-of-Experts models.

Language modelling (word level): `ptb_lm_data` (embedded default corpus),
`lm1b_lm_data` (1B Word benchmark), `news_lm_data` (sharded news text),
`debian_docs_lm_data` (Debian's English documentation, built with
`build_debian_docs`), all returning `LmData`. Translation (shared
wordpieces): `wmt14_mt_data`, `debian_mt_data` (+ `build_debian_translations`),
`multilingual_mt_data`, returning `MtData`. `get_data()` calls whichever gin selected. See README.md.
"""

from data_pipelines.batching import PipelineStats
from data_pipelines.batching import STAT_NAMES
from data_pipelines.config import get_data
from data_pipelines.debian_docs import build_debian_docs
from data_pipelines.debian_docs import debian_docs_lm_data
from data_pipelines.debian_translations import build_debian_translations
from data_pipelines.debian_translations import debian_mt_data
from data_pipelines.errors import DataError
from data_pipelines.lm import LmData
from data_pipelines.lm import lm_dataset
from data_pipelines.lm1b import lm1b_lm_data
from data_pipelines.mt import MtData
from data_pipelines.mt import mt_dataset
from data_pipelines.mt import ParallelCorpus
from data_pipelines.multilingual import multilingual_mt_data
from data_pipelines.news_shards import news_lm_data
from data_pipelines.ptb import ptb_lm_data
from data_pipelines.wmt14 import wmt14_mt_data
from data_pipelines.word_vocab import WordVocab
from data_pipelines.wordpiece import WordpieceTokenizer
from data_pipelines.wordpiece import WordpieceVocab
