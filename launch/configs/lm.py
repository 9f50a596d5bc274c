"""Settings shared by the language-model tasks (lm_learned_lr, lm_maml,
lm_loss_weighting); each task's config file starts from these.

The defaults run on 2 CPU cores in minutes: the ``tiny`` preset on 128-byte
sequences of the embedded corpus (Python's documentation topics); use
``--config.task.data_path=FILE[,FILE...]`` for other text and
``--config.task.preset=chinchilla_57m`` (etc.) for the paper's sizes.
"""

from launch.configs import default


def get_config():
  config = default.get_config()
  config.task.data_path = ""          # "" = embedded corpus; comma-separated
                                      # files
  config.task.preset = "tiny"         # tasks.lm.model.PRESETS
  config.task.seq_len = 128           # bytes per sequence L
  config.task.batch_size = 4          # B, sequences per inner step and outer
                                      # batch
  config.task.inner_lr = 3e-3         # inner Adam (the initial value if
                                      # learned)
  config.task.compute_dtype = ""      # "" (= parameters' dtype) or "bfloat16"
  config.task.remat_blocks = False    # jax.checkpoint around each block
  config.task.attention = "auto"      # dense | blockwise (memory linear in L)
                                      # | auto (blockwise above 512 tokens)
  config.task.attention_block = 512   # tokens per tile of blockwise attention
  config.task.strict_utf8 = False     # refuse non-UTF-8 files (default: warn)
  config.inner_steps = 4              # T
  config.meta_batch_size = 1          # episodes per meta-step (each: T x B + B)
  config.meta_steps = 300
  config.outer_lr = 1e-3
  config.num_eval_tasks = 16          # held-out episodes per evaluation
  config.eval_split = "validation"    # outer text never seen in meta-training
  config.log_every = 25
  config.checkpoint_every = 100
  return config
