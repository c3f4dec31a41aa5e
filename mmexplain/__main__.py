"""``python -m mmexplain`` (also ``torchrun ... -m mmexplain eval ...``)."""

import sys

from mmexplain.cli import main

sys.exit(main())
