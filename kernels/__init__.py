"""gptfast.kernels: Triton kernels, one file per op, each with its launch wrapper.

Nothing here knows about models; ``gptfast.functional`` is the only caller. Importing a
kernel module imports triton, so ``gptfast`` imports them lazily.
"""
