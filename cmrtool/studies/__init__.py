"""Stage 7 of the pipeline, *studies*: questions asked over many runs of the other stages.

- :mod:`~cmrtool.studies.audit`: audits no other tool offers (DESIGN §3.6: rescaling, criteria agreement);
- :mod:`~cmrtool.studies.sweep`: the fidelity / compression trade-off over keep fractions and criteria;
- :mod:`~cmrtool.studies.plot`: PNG plots of sweep results (matplotlib, optional).

A study calls score, reduce, compile and verify (through :mod:`cmrtool.api`) and renders a table
of their results (DESIGN §8).
"""
