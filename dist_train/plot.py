"""`python -m dist_train.plot`: see `dist_train.monitor.plot`."""

import sys

from dist_train.monitor.plot import main

if __name__ == "__main__":
    sys.exit(main())
