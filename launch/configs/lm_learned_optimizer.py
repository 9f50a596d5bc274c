"""lm_learned_optimizer: a learned update rule meta-trained online on the
tiny transformer (P=4 learners, windows of T=4 steps, lifetimes drawn
log-uniform in [100, 1000] steps, the meta-gradient clipped to norm 1)."""

from launch.configs import lm


def get_config():
  config = lm.get_config()
  config.task.rule_hidden = (16, 16)      # the learned optimizer's MLP
  config.task.rule_output = "normalized"  # normalized | magnitude
  config.task.resample_init = True        # (online: every learner is fresh)
  config.inner_steps = 4                  # T: the window of each meta-step
  config.online.population = 4            # P learners at staggered ages
  config.online.lifetime = 100            # the shortest life (inner steps)
  config.online.lifetime_max = 1000       # the longest: log-uniform between
  config.outer_clip = 1.0
  return config
