"""Stage 5 of the pipeline, *verify*: is the reduced model a faithful causal abstraction of the original?

- :mod:`~cmrtool.verify.report`: the verify run (fold error, plain fidelity, interchange runs per
  site and for all sites) and its :class:`~cmrtool.verify.report.VerifyReport` (DESIGN §3.5);
- :mod:`~cmrtool.verify.interchange`: interchange interventions between samples (cached clean
  values, seeded masks, downstream re-runs);
- :mod:`~cmrtool.verify.metrics`: per-sample figures (KL, margins, Wilson interval, Theorem 2's certificate);
- :mod:`~cmrtool.verify.lm`: token models (a Hugging Face language model or encoder as base + head);
- :mod:`~cmrtool.verify.token_metrics`: per-token fidelity as streaming accumulators;
- :mod:`~cmrtool.verify.token_swaps`: interchange interventions between tokens.

It runs the original and the compiled model side by side through :mod:`cmrtool.backends` (DESIGN §8).
"""
