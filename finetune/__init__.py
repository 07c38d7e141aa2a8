"""Fine-tuning stages for DeepSeek-V3-architecture models: sft, dpo, cpt, chat, evaluate, demo (see cli.STAGES)."""

import os

# Huge pages for large CPU tensors, set before torch loads (why: model/__init__.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
