"""Allow ``python -m pnn``."""

from .cli import main

raise SystemExit(main())
