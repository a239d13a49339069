"""``python -m qmpd``."""

import sys

from qmpd.cli.main import main

sys.exit(main())
