import sys

from secfl.cli import main

sys.exit(main())
