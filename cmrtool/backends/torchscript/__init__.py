"""The TorchScript backend: ``torch.jit.save`` files, no Python class needed (DESIGN §2).

- :mod:`~cmrtool.backends.torchscript.model`: :class:`~cmrtool.backends.torchscript.model.TorchScriptModel`:
  loading, site discovery by walking the graph, capture, override and writing;
- :mod:`~cmrtool.backends.torchscript.discover`: the op tables and node predicates of site discovery;
- :mod:`~cmrtool.backends.torchscript.downstream`: the network after a cut, re-run for interventions;
- :mod:`~cmrtool.backends.torchscript.graph`: graphs prepared once, then copied and edited into small functions;
- :mod:`~cmrtool.backends.torchscript.tsargs`: non-tensor forward arguments and the control flow on them.
"""
