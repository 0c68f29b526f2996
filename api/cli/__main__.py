"""`python -m twostage.api.cli`: the `twostage` command."""

import sys

from twostage.api.cli.main import main

sys.exit(main())
