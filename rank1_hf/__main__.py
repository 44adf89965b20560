"""``python -m rank1_hf ...`` (also what ``accelerate launch -m rank1_hf`` runs): the rank1-hf CLI."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
