"""gptfast.bench: sweeps, microbenchmarks and plots behind ``gptfast bench``.

Where a benchmark row is measured and written:

- :mod:`.common`: the measurement core every suite uses (``Meter``: timing and peak memory on
  CUDA or a CPU; the run context; ``ResultsWriter``: jsonl rows as they come;
  ``markdown_table``);
- one module per op, each also a script (``python -m gptfast.bench.attention``):
  :mod:`.attention`, :mod:`.document_attention`, :mod:`.nanochat_attention`,
  :mod:`.cross_entropy`, :mod:`.layernorm`, :mod:`.rotary`, :mod:`.loader`; the GPT step:
  :mod:`.gpt` (with the nanoGPT baseline, :mod:`.nanogpt`);
- the ``gptfast bench`` sweep: :mod:`.sweep` (the command), :mod:`.kernel_suite` and
  :mod:`.loader_suite` (the per-op measurements as rows), :mod:`.report` (console lines and
  results.md), :mod:`.plots`;
- :mod:`.headline`: ``gptfast bench --suite headline``, built on the modules above (never the
  reverse);
- :mod:`.autotune` (the autotune clock and the configs kept) and :mod:`.sm90` (the sm_90
  compile report).
"""
