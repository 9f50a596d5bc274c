"""sinusoid_maml: MAML on few-shot sinusoid regression (K=10, 5 inner SGD
steps)."""

from launch.configs import default


def get_config():
  config = default.get_config()
  config.task.num_shots = 10
  config.task.num_query = 10
  config.task.widths = (40, 40)
  config.task.inner_lr = 0.01
  config.task.learn_lr = False
  config.task.proximal = 0.0          # iMAML term lam/2 ||theta - theta0||^2
                                      # (implicit: > 0)
  config.inner_steps = 5
  config.meta_batch_size = 25
  config.meta_steps = 2000
  config.outer_lr = 3e-3
  config.num_eval_tasks = 200
  config.log_every = 250
  config.checkpoint_every = 1000
  return config
