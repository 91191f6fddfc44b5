"""``python -m mdm_lite ...`` is ``mdm-lite ...``; torchrun needs this form:
``torchrun --nproc_per_node 4 -m mdm_lite train --preset colab``."""
import sys

from .cli import main

sys.exit(main())
