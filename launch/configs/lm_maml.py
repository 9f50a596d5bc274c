"""lm_maml: the learned initialisation of the transformer (T=4, tiny preset)."""

from launch.configs import lm


def get_config():
  config = lm.get_config()
  config.outer_lr = 1e-3
  config.task.proximal = 0.0          # iMAML term lam/2 ||theta - theta0||^2
                                      # (implicit: > 0)
  return config
