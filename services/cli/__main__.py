"""``python -m inferline.services.cli``: how `inferline up` starts its stages."""

import sys

from inferline.services.cli import main

sys.exit(main())
