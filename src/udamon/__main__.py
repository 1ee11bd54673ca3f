import sys

from udamon.cli.main import main

sys.exit(main())
