"""Built-in bilevel problems; importing this package registers them by name."""

from tasks import (
    fewshot,  # noqa: F401
    learned_optimizer,  # noqa: F401
    sinusoid,  # noqa: F401
)
from tasks.lm import tasks as lm_tasks  # noqa: F401
