"""The runners a user types, from a checkout: ``python -m launch.NAME``.

* ``train``: meta-train a registered task (absl flags, ml_collections
  configs in ``launch/configs``; ``--help`` lists the tasks, ``--task X
  --help`` every ``--config`` key of X).
* ``evaluate``, ``curate``: use what a trained run learned.
* ``plan``: the fastest strategy and largest sizes that fit a device.
* ``benchmark``, ``benchmark_lm``: compiled memory and step time per strategy.
* ``cluster.local``, ``cluster.tpu_pod``, ``cluster.slurm``: start
  ``launch.train`` as the processes of one run.

Every runner reports bad input as one line, ``error: ...``, on stderr with
exit status 2. The paper sweep and the studies are in ``experiments/``.
"""
