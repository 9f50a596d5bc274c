"""The MixFlow-MG paper's benchmarks on the language-model tasks (Table 1's
grid, the largest model that fits, step times): ``python -m
experiments.paper_sweep --sweep paper|largest|time``; the code in `sweep`, the
committed JSON lines and plots beside it."""
