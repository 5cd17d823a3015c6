import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # parallel_helpers.py, parallel_worker.py
