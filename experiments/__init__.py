"""Experiments: the paper sweep and the studies, each a package run with
``python -m experiments.NAME`` whose committed results lie beside its code.

* ``experiments.paper_sweep``: the MixFlow-MG paper's memory and time tables.
* ``experiments.data_rater``: the data-curation study (a meta-learned rater).
* ``experiments.estimators``: how the approximate estimators compare.
* ``experiments/learned_lr_online``: learned learning rates, meta-trained
  online (results of ``launch.train`` + ``launch.evaluate``; see its README).
"""
