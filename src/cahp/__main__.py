"""``python -m cahp``: the same as the ``cahp`` command."""

import sys

from cahp.cli import main

sys.exit(main())
