"""Stage 6 of the pipeline, *measure*: what a model offers and what a reduction bought.

- :mod:`~cmrtool.measure.inspection`: sites, widths, fold kinds, parameters and MACs (``cmrtool inspect``);
- :mod:`~cmrtool.measure.macs`: MAC counting per layer;
- :mod:`~cmrtool.measure.bench`: parameters, file size and MACs beside measured throughput (``cmrtool bench``);
- :mod:`~cmrtool.measure.bench_lm`: prefill and decode tokens per second of causal language models;
- :mod:`~cmrtool.measure.runners`: what is timed (checkpoints under torch, ``.onnx`` under onnxruntime);
- :mod:`~cmrtool.measure.timing`: the timing protocol (warm-up, alternating rounds);
- :mod:`~cmrtool.measure.precision`: where and in what precision the benchmark runs.

It reads models through :mod:`cmrtool.backends` and compiled outputs (DESIGN §3.7, §8).
"""
