"""Built-in bilevel problems; importing this package registers them by name."""

from tasks import sinusoid  # noqa: F401
from tasks import fewshot  # noqa: F401
