"""`python -m dist_train.export`: see `dist_train.tools.export`."""

import sys

from dist_train.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
