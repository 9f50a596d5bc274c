"""Settings shared by every task; a task's config file starts from these.

Every key can be overridden on the command line: ``--config.meta_steps=500``,
``--config.task.num_shots=5``.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # The task's own settings (fields of its Task dataclass), set per task.
  config.task = ml_collections.ConfigDict()
  # Gradient strategy: standard | mixflow, optionally
  # +remat[+saved_inner_grads], +segments=K|K1/K2/...|auto, +microbatches=M
  # (exact; segments=auto: the schedule storing the fewest carries);
  # implicit | first_order (approximate; implicit with a learned initialisation
  # needs --config.task.proximal > 0); auto: the fastest exact one whose
  # meta-step fits memory_budget per device (metaflow.planner).
  config.strategy = "mixflow"
  config.memory_budget = ""         # with strategy auto: e.g. "16GiB"
  config.cg_steps = 20              # implicit only: most CG iterations (HVPs)
  config.cg_damping = 0.0           # implicit only: (H + damping I) u = v
  config.inner_steps = 5            # T
  config.meta_steps = 1000          # total meta-steps (a resumed run continues)
  config.meta_batch_size = 4        # episodes per meta-step (offline)
  # Persistent inner learners (metaflow.Online): population P > 0 keeps P
  # learners whose windows of inner_steps continue across meta-steps, each
  # replaced by a fresh model after lifetime N inner steps (a multiple of
  # inner_steps). The meta-batch is then the population: meta_batch_size is
  # not used. 0: off, every episode starts afresh.
  config.online = ml_collections.ConfigDict()
  config.online.population = 0
  config.online.lifetime = 0        # N (with lifetime_max: the shortest)
  config.online.lifetime_max = 0    # > lifetime: each life drawn log-uniform
                                    # in [lifetime, lifetime_max] (whole
                                    # windows); 0: every life is lifetime
  config.outer_optimizer = "adam"   # adam | sgd
  config.outer_lr = 1e-3            # the outer optimiser's learning rate
  config.outer_clip = 0.0           # clip the meta-gradient to this global
                                    # norm first (0: off)
  config.seed = 0                   # parameters, episodes and learners
  config.num_eval_tasks = 100       # held-out episodes per evaluation
  config.eval_split = "validation"  # held-out split: validation | test
  config.log_every = 100           # meta-steps between metric rows
  config.eval_every = 0             # 0: evaluate at the start and the end only
  config.checkpoint_every = 500     # 0: checkpoint at the end only
  config.keep_checkpoints = 3       # the most recent checkpoints kept
  # A meta-step with a non-finite outer loss or meta-gradient is skipped;
  # this many in a row stop the run (with a checkpoint of the last finite
  # state).
  config.max_skipped_steps = 10
  config.num_workers = 0            # Grain worker processes (0: in process)
  # Devices: a (data, fsdp) mesh over every device of every process; -1 for
  # one axis means the rest (metaflow.sharding.make_mesh). Not part of the
  # checkpoint fingerprint: a run resumes on any mesh.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.x64 = False                # float64 parameters and meta-parameters
  return config
