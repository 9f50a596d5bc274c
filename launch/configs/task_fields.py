"""The config of a task without a config file of its own, such as a user's
task launched as ``--task package.module:ClassName``: the shared defaults
(`default.py`) with ``config.task`` holding the task dataclass's fields at
their defaults, so that ``--config.task.FIELD=value`` sets any of them.

``launch.train`` passes the task as the config argument
(``--config=launch/configs/task_fields.py:TASK``).
"""

from launch.configs import default


def get_config(task: str):
  from metaflow.task import task_defaults

  config = default.get_config()
  for name, value in task_defaults(task).items():
    config.task[name] = value
  return config
