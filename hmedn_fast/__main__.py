"""``python -m hmedn_fast <command>``: same as the ``hmedn`` console script."""
from hmedn_fast.cli import main

raise SystemExit(main())
