"""Stage 1 of the pipeline, *io*: files in and out, before any model runs.

- :mod:`~cmrtool.io.files`: reading inputs (``-`` is stdin), hashing, atomic writes;
- :mod:`~cmrtool.io.tensorfile`: tensor files read by row ranges (safetensors, ``.npy``);
- :mod:`~cmrtool.io.data`: calibration and held-out data in batches, with masks;
- :mod:`~cmrtool.io.datacheck`: data that cannot belong to the model, refused early;
- :mod:`~cmrtool.io.integrity`: byte-level integrity of model files;
- :mod:`~cmrtool.io.planstore`: where a plan travels in each output format;
- :mod:`~cmrtool.io.partials`: directory outputs under construction (owned, locked, cleaned up);
- :mod:`~cmrtool.io.noreplace`: naming an output without replacing what appeared meanwhile;
- :mod:`~cmrtool.io.safety`: no code runs because a file names it;
- :mod:`~cmrtool.io.interrupts`: Ctrl-C and SIGTERM give no output or the complete output.

Every other stage reads and writes through it; it imports none of them (DESIGN §4, §6, §8).
"""
