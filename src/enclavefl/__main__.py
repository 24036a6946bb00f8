"""``python -m enclavefl`` is the ``enclavefl`` command."""

import sys

from enclavefl.cli import main

sys.exit(main())
