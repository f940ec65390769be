"""Stage 3 of the pipeline, *reduce*: scores → which units stay, and what replaces the others.

- :mod:`~cmrtool.reduce.selection`: how many units a site keeps, and which (the highest-scoring);
- :mod:`~cmrtool.reduce.plans`: a plan from scores (kept units, constant replacements), and plans composed;
- :mod:`~cmrtool.reduce.planner`: a reduction in one step or a schedule of K steps with re-scoring;
- :mod:`~cmrtool.reduce.affine`: affine replacements on r kept parent units (CMR A.5);
- :mod:`~cmrtool.reduce.lsq`: least-squares compensation on all kept units of a site;
- :mod:`~cmrtool.reduce.refit`: the constants of a site's replaced units, fitted jointly.

It reads scores from :mod:`cmrtool.score` and produces a :class:`~cmrtool.plan.Plan` for
:mod:`cmrtool.compile` (DESIGN §3.3, §8).
"""
