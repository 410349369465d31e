"""``python -m iqa_verify`` is the ``iqa-verify`` command."""

import sys

from iqa_verify.cli import main

sys.exit(main())
