import sys

from wbdit.cli import main

sys.exit(main())
