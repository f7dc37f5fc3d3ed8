import sys

from tinystories.cli import main

sys.exit(main())
