"""The benchmark suites import their GPU scripts' helpers (``from gpu_targets import ...``): put this folder on
``sys.path`` so that they import under any ``--import-mode`` (``importlib`` is needed when these suites run
together with ``tests/``, whose ``test_loss.py`` shares a basename with ``benchmarks/test_loss.py``)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
