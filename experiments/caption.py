"""`./launch.sh caption --workdir DIR --image PATH`: see experiments/ask.py."""
from __future__ import annotations

import sys

from experiments import ask

if __name__ == "__main__":
  ask.main(sys.argv, caption=True)
