"""Shared test setup."""

import os
import shutil
import tempfile

# Tests never download: every dataset and model they load is built locally. Set before
# `datasets` and `huggingface_hub` are imported, since both read these once at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# Keep the copies `datasets` makes of the test fixtures out of the user's cache.
_DATASETS_CACHE = tempfile.mkdtemp(prefix="mdm-lite-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
# Silence the fork warning of tokenizers when a DataLoader starts workers.
os.environ["TOKENIZERS_PARALLELISM"] = "false"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)
