"""`python -m dist_train.average`: see `dist_train.tools.average`."""

import sys

from dist_train.tools.average import main

if __name__ == "__main__":
    sys.exit(main())
