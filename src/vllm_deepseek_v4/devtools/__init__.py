"""What the tests, ``scripts/`` and ``benchmarks/`` share: synthetic artifacts and their makers.

- ``artifacts``: tiny random DSv4 checkpoints in every naming convention and quant format (renaming tables
  written independently of ``naming/rules``, so loading them tests the rules rather than restating them);
- ``zoo_formats`` and ``zoo``: every artifact layout users meet, quantized by the real producers' libraries
  (``scripts/build_zoo.py`` is its command line);
- ``flash``: the published DeepSeek-V4-Flash layout (69,187 tensors) as a sparse artifact;
- ``corpus``: readers of the tiny model's training / held-out text in ``data/tiny_corpus/``;
- ``records``: run metadata and the JSON + markdown result files of ``benchmarks/`` and ``scripts/``.

Nothing in the runtime, the planner or the vLLM plugin imports this package; it may import torch,
safetensors and (lazily) the peer libraries of the ``peers`` extra.
"""
