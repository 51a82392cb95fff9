"""Benchmark, ablation and report tooling, kept apart from the library: ``import pvt_lightning`` never imports it.

- ``timing``: timed training / inference steps, models interleaved step by step, paired speed ratios.
- ``memory``: peak memory of a few steps, in this process or a fresh one.
- ``reference``: the independent implementation of a variant (timm, torchvision) with our weights.
- ``tables``: CSV and markdown tables.
- ``synthetic``: generated photo-like JPEG folders for data-loading benchmarks.
- ``ablation``: linear SRA on vs off (``notebooks/linear_sra_ablation.ipynb``).

``experiments/benchmark.py`` is the command line on top of it.
"""
