"""``python -m experiments.long_context``: see
`experiments.long_context.study`."""

import sys

from experiments.long_context import study

if __name__ == "__main__":
  sys.exit(study.main())
