"""Stage 4 of the pipeline, *compile*: a plan becomes a smaller checkpoint, checked exactly.

- :mod:`~cmrtool.compile.fold`: the fold, a pure function of (tensors, sites, plan) → smaller tensors (CMR A.5);
- :mod:`~cmrtool.compile.run`: scores → plan → folded tensors → written checkpoint, checked against the
  clamped original (the original with replaced units overridden: :func:`~cmrtool.compile.run.clamp_edits`);
- :mod:`~cmrtool.compile.export`: ONNX output for every backend;
- :mod:`~cmrtool.compile.onnxcheck`: an ONNX file is an export of *this* reduced model (``verify --onnx``).

It takes a plan from :mod:`cmrtool.reduce` and writes through :mod:`cmrtool.backends` (DESIGN §3.5, §8).
"""
