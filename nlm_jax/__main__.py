import sys

from nlm_jax.cli import main

sys.exit(main())
