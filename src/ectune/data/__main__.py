"""`python -m ectune.data download fashion-mnist [--dest DIR] [--base-url URL]`."""

import sys

from ectune.data.fmnist import main

if __name__ == "__main__":
    sys.exit(main())
