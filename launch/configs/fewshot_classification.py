"""fewshot_classification: MAML, 5-way 1-shot, meta-train digits 0-4,
meta-test 5-9."""

from launch.configs import default


def get_config():
  config = default.get_config()
  config.task.data_path = ""          # "" = scikit-learn's bundled 8x8 digits
  config.task.train_classes = (0, 1, 2, 3, 4)
  config.task.test_classes = (5, 6, 7, 8, 9)
  config.task.num_ways = 5
  config.task.num_shots = 1
  config.task.num_query = 15
  config.task.channels = 16
  config.task.num_blocks = 3
  config.task.inner_lr = 0.2
  config.task.learn_lr = False
  config.task.lr_granularity = "element"
  config.task.proximal = 0.0          # iMAML term lam/2 ||theta - theta0||^2
                                      # (implicit: > 0)
  config.task.augment_train = True    # rotated/mirrored classes for
                                      # meta-training
  config.inner_steps = 5
  config.meta_batch_size = 4
  config.meta_steps = 1000
  config.outer_lr = 1e-3
  config.num_eval_tasks = 200
  config.eval_split = "test"
  config.log_every = 50
  config.checkpoint_every = 500
  return config
