import sys

from microserve.cli import main

sys.exit(main())
