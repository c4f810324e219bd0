"""`python -m fflora.cli`: the `fflora` command."""

import sys

from . import main

sys.exit(main())
