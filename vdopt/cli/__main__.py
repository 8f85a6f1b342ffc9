"""``python -m vdopt.cli``: the same as the ``vdopt`` command."""

import sys

from vdopt.cli import main

sys.exit(main())
