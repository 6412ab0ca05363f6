"""Metrics, each a small function on plain Python/numpy inputs, with the standard definitions.

- `perplexity`: exp(total NLL / total target tokens), teacher-forced; the reference's two labelled
  variants (`ref_self_ppl`, `ref_uncond_ppl`) are computed with the same function on other inputs.
- `distinct`: Dist-n, corpus level (Li et al. 2016) and the per-reply mean.
- `bertscore`: BERTScore P/R/F1 (bert-score) with a local model, rescaled when a baseline is known.
- `emotion`: emotion distributions (lexicon, HF classifier, merg's MELD classifier) and alignment.
- `sentiment`: VADER compound and alignment.
- `bootstrap`: 95% intervals for any aggregate.
"""

from evaluation.metrics.bootstrap import bootstrap_ci
from evaluation.metrics.distinct import distinct_n, mean_distinct_n, word_tokens
from evaluation.metrics.perplexity import perplexity
from evaluation.metrics.sentiment import sentiment_alignment, vader_compound

__all__ = [
    "bootstrap_ci", "distinct_n", "mean_distinct_n", "perplexity", "sentiment_alignment", "vader_compound",
    "word_tokens",
]  # fmt: skip
