import sys

from dpimages.cli import main

sys.exit(main())
