"""``python -m peft_cofi ...`` runs the ``peft-cofi`` command line."""

import sys

from .cli import main

sys.exit(main())
