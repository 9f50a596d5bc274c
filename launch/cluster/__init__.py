"""Cluster launchers: each starts ``launch.train`` as the processes of one run.

``python -m launch.cluster.local`` (N processes on this machine),
``python -m launch.cluster.tpu_pod`` (every worker of a Cloud TPU VM slice),
``python -m launch.cluster.slurm`` (an sbatch script, one task per node).
"""
