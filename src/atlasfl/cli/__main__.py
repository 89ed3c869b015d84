"""`python -m atlasfl.cli ...` is `atlas ...`."""
import sys

from atlasfl.cli.app import main

sys.exit(main())
