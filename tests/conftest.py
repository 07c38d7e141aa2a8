"""Shared test setup."""

import os

# Huge pages for large CPU tensors, set before any test module imports torch (why: model/__init__.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# `bf16: auto` resolves to fp32 in the suite: its stage tests compare against fp32 references (trl's losses, one
# process vs a launch) at fp32 tolerances. tests/finetune/test_precision.py tests the detection and bf16 autocast.
os.environ.setdefault("DSV3_AUTO_BF16", "0")
