"""How the approximate estimators (implicit, first-order) compare with the
exact ones: ``python -m experiments.estimators``; the code in `study`."""
