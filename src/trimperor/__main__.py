import sys

from trimperor.cli import main

sys.exit(main())
