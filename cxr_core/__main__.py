"""``python -m cxr_core``: see cxr_core/cli.py."""
from .cli import main

raise SystemExit(main())
