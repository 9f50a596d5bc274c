"""mlp_learned_optimizer: a learned update rule meta-trained online on
digits MLPs (P=8 learners, each a family of 4 MLPs of different
architectures, windows of T=20 steps, lifetimes drawn log-uniform in
[200, 2000] steps, outer Adam with the meta-gradient clipped to global
norm 1; about 10 minutes on 2 CPU cores)."""

from launch.configs import default


def get_config():
  config = default.get_config()
  config.task.widths = (32,)          # the classifier: 64 -> widths -> 10
  config.task.activation = "relu"
  config.task.batch_size = 128        # digits per inner / outer batch
  config.task.inner_lr = 1e-3         # scales the rule's update
  config.task.rule_hidden = (16, 16)  # the learned optimizer's MLP
  config.task.rule_output = "normalized"  # normalized | magnitude
  config.task.resample_init = True    # (online: every learner is fresh)
  config.task.family_size = 4         # G MLPs per learner: widths + G-1 drawn
  config.task.family_depths = (1, 3)  # a drawn one's hidden layers (min, max)
  config.task.family_widths = (16, 128)  # and each layer's width (min, max)
  config.task.family_activations = ("relu", "tanh", "gelu", "silu")
  config.task.family_seed = 0
  config.inner_steps = 20             # T: the window of each meta-step
  config.online.population = 8        # P learners at staggered ages
  config.online.lifetime = 200        # the shortest life (inner steps)
  config.online.lifetime_max = 2000   # the longest: log-uniform between
  config.outer_lr = 1e-3
  config.outer_clip = 1.0
  config.meta_steps = 600
  config.num_eval_tasks = 8
  config.log_every = 50
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
