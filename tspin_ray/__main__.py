import sys

from tspin_ray.cli import main

sys.exit(main())
