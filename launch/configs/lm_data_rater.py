"""lm_data_rater: a sequence rater (DataRater) meta-learned online through
windows of a population of inner models at every stage of their training
(T=2, tiny inner preset, the "rater" preset for the rater)."""

from launch.configs import lm


def get_config():
  config = lm.get_config()
  config.task.target_path = ""        # "" = the pool's own outer part
  config.task.rater_preset = "rater"  # tasks.lm.model.PRESETS
  config.task.rater_ngrams = 4096     # hashed bigram and trigram buckets
                                      # of the rater, with its lag repeats
                                      # (0: neither)
  config.task.temperature = 1.0       # weights: B * softmax(scores / temp)
  config.task.resample_init = True    # (online: every learner is fresh)
  config.task.seq_len = 64
  config.task.batch_size = 16         # the sequences a softmax compares
  config.inner_steps = 2              # T: the window of each meta-step
  config.online.population = 4        # P learners at staggered ages
  config.online.lifetime = 500        # N inner steps of a learner's life
  config.outer_lr = 3e-3
  return config
