import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the shared fixtures modules (library_fixtures, fusion_fixtures)
