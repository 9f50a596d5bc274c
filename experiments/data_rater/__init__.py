"""The data-curation study: does a meta-learned data rater tell useful text
from noise? ``python -m experiments.data_rater``; the code in `study`, the
committed ``data_rater.json`` and plots beside it."""
