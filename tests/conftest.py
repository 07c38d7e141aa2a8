"""Shared test setup."""

import os

# Huge pages for large CPU tensors, set before any test module imports torch (why: model/__init__.py).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
