"""`python -m vsd_ext ...` (and `torchrun ... -m vsd_ext train ...`): the `vsd` command."""
import sys

from .app.cli import main

sys.exit(main())
