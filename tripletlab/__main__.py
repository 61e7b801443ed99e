"""``python -m tripletlab``: the same as the ``tripletlab`` command."""

import sys

from tripletlab.cli import main

sys.exit(main())
