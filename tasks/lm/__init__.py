"""Language-model meta-learning: a Chinchilla-style NNX transformer (`model`),
byte-level text pipelines through Grain (`text`) and the paper's three tasks
(`tasks`: lm_learned_lr, lm_maml, lm_loss_weighting, and DataRater's
lm_data_rater)."""
