"""``python -m qmpd``."""

import gc
import sys

# Start-up creates only long-lived objects (modules, classes, the schema):
# no collection until the daemon has loaded (qmpd.cli.main turns it back on).
gc.disable()

from qmpd.cli.main import main  # noqa: E402

sys.exit(main())
