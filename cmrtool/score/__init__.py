"""Stage 2 of the pipeline, *score*: every unit of every site gets a score (lower = replaced first).

- :mod:`~cmrtool.score.stats`: streaming per-unit statistics in float64, mergeable (DESIGN §3.1);
- :mod:`~cmrtool.score.evidence`: one streaming pass gathering what a criterion needs;
- :mod:`~cmrtool.score.sensitivity`: per-sample loss gradients and Gauss-Newton curvature;
- :mod:`~cmrtool.score.criteria`: the criteria, pure functions in a registry keyed by name;
- :mod:`~cmrtool.score.groups`: grouped units (an attention head is one unit);
- :mod:`~cmrtool.score.scoring`: the scoring pass and its :class:`~cmrtool.score.scoring.ScoreReport`.

It runs models through :mod:`cmrtool.backends` over data from :mod:`cmrtool.io`; its scores feed
:mod:`cmrtool.reduce` (DESIGN §3.1-3.2, §8).
"""
