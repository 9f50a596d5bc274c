"""``python -m experiments.data_rater``: see `experiments.data_rater.study`."""

import sys

from experiments.data_rater import study

if __name__ == "__main__":
  sys.exit(study.main())
