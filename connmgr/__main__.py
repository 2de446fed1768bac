import sys

from connmgr.ops.cli import main

sys.exit(main())
