import sys

from wmfast.cli import main

sys.exit(main())
