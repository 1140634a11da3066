import sys

from mamlext.cli import main

sys.exit(main())
