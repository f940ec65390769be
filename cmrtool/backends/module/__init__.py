"""The nn.Module backend: safetensors weights with an architecture, or a Hugging Face directory (DESIGN §2).

- :mod:`~cmrtool.backends.module.model`: the model object (capture, override, writing);
- :mod:`~cmrtool.backends.module.fxsites`: sites of plain nn.Modules found by torch.fx tracing;
- :mod:`~cmrtool.backends.module.patterns`: sites found by module structure (transformer layouts);
- :mod:`~cmrtool.backends.module.families`, :mod:`~cmrtool.backends.module.familysites`: the family
  table and the sites of its layer types;
- :mod:`~cmrtool.backends.module.layouts`: stock parameters seen in Linear's ``(out, in)`` layout;
- :mod:`~cmrtool.backends.module.experts`: one expert inside a bank of fused experts;
- :mod:`~cmrtool.backends.module.checkpoint`: safetensors checkpoints (with ``--arch``) and reduced ones;
- :mod:`~cmrtool.backends.module.hf`, :mod:`~cmrtool.backends.module.hfout`,
  :mod:`~cmrtool.backends.module.hfcheck`: Hugging Face directories in and out, and their checks.
"""
