"""``python -m rank1_hf ...`` (also what ``accelerate launch -m rank1_hf`` runs): the rank1-hf CLI."""

import sys

if __name__ == "__main__":
    try:
        from .cli import main
    except KeyboardInterrupt:  # Ctrl-C while the CLI's modules import: the same exit as at any later moment
        print("rank1-hf: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(main())
