"""``python -m experiments.paper_sweep``: see
`experiments.paper_sweep.sweep`."""

import sys

from experiments.paper_sweep import sweep

if __name__ == "__main__":
  sys.exit(sweep.main())
