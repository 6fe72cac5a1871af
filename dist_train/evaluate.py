"""`python -m dist_train.evaluate`: see `dist_train.tools.evaluate`."""

import sys

from dist_train.tools.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
