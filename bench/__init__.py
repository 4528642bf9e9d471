"""gptfast.bench: sweeps, microbenchmarks and plots behind ``gptfast bench``."""
