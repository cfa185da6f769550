"""``python -m zscir`` runs the ``zscir`` command."""
import sys

from .cli import main

sys.exit(main())
