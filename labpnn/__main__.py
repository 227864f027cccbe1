"""``python -m labpnn``: the ``labpnn`` command, for a shell whose PATH lacks the venv's ``bin/``."""
import sys

from labpnn.cli import main

sys.exit(main())
