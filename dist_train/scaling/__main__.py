"""`python -m dist_train.scaling {count,plan,memory,fit}`."""

import sys

from dist_train.scaling.cli import main

sys.exit(main())
