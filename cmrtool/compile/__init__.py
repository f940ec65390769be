"""Stage 4 of the pipeline, *compile*: a plan becomes a smaller checkpoint, checked exactly.

- :mod:`~cmrtool.compile.fold`: the fold, a pure function of (tensors, sites, plan) → smaller tensors (CMR A.5);
- :mod:`~cmrtool.compile.clamp`: the clamped original (replaced units overridden by their
  replacements) and the fold error of a reduced model against it;
- :mod:`~cmrtool.compile.run`: plan → folded tensors → written checkpoint, reloaded and checked;
- :mod:`~cmrtool.compile.export`: ONNX output for every backend;
- :mod:`~cmrtool.compile.onnxcheck`: an ONNX file is an export of *this* reduced model (``verify --onnx``).

It takes a plan from :mod:`cmrtool.reduce` and writes through :mod:`cmrtool.backends` (DESIGN §3.5, §8).
"""
