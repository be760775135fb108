"""``python -m bench``: see bench/__init__.py."""
import sys

from .pipeline import main

sys.exit(main())
