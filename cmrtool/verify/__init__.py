"""Stage 5 of the pipeline, *verify*: is the reduced model a faithful causal abstraction of the original?

- :mod:`~cmrtool.verify.report`: the verify run, its interchange interventions and per-sample
  metrics, and the :class:`~cmrtool.verify.report.VerifyReport` (DESIGN §3.5);
- :mod:`~cmrtool.verify.lm`: token models (a Hugging Face language model or encoder as base + head);
- :mod:`~cmrtool.verify.token_metrics`: per-token fidelity as streaming accumulators;
- :mod:`~cmrtool.verify.token_swaps`: interchange interventions between tokens.

It runs the original and the compiled model side by side through :mod:`cmrtool.backends` (DESIGN §8).
"""
