"""Evaluation: editing metrics (CounterFact, zsRE, retention) and general capability.

Every function takes ``lm`` — any object with ``model`` (a transformers causal LM),
``tokenizer`` and ``device`` — and data file paths; nothing is downloaded or cached.

* :mod:`.scoring` — batched, padded, no-grad log-probabilities, top-k and decoding;
* :mod:`.counterfact` — ROME's efficacy / generalization / specificity, EasyEdit top-1,
  fluency (:mod:`.fluency`) and consistency (:mod:`.consistency`);
* :mod:`.zsre` — MEND/EasyEdit token accuracy and pre-edit locality;
* :mod:`.pre_edit` — the unedited model's argmaxes that EasyEdit's locality compares against
  (for an edited state, from its own unedited weights ``W_0``);
* :mod:`.retention` — efficacy by edit position after a stream (forgetting curve);
* :mod:`.general` — perplexity, known-facts recall, scored multiple choice (GLUE subsets, MMLU);
* :mod:`.gsm8k`, :mod:`.humaneval` (with :mod:`.sandbox`) — generation benchmarks;
* :mod:`.runner` — :func:`~rlsedit.eval.runner.run_eval`, all of the above in one JSON-able dict.

Errors in data files or arguments raise :class:`~rlsedit.eval.datafiles.EvalDataError`.
"""
