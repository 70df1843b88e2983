"""``python -m pyiqa_grmp ARGS`` is ``pyiqa-grmp ARGS`` (the form torchrun launches: ``torchrun -m pyiqa_grmp``)."""
import sys

from .cli import main

sys.exit(main())
