import sys

from longgen.cli import main

sys.exit(main())
