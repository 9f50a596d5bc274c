"""``python -m experiments.estimators``: see `experiments.estimators.study`."""

import sys

from experiments.estimators import study

if __name__ == "__main__":
  sys.exit(study.main())
