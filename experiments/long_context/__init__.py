"""Long context and long horizons: memory of the meta-gradient along the
sequence length (dense vs blockwise attention) and the horizon (one level vs
nested segments): ``python -m experiments.long_context``; the code in
`study`."""
