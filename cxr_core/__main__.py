"""``python -m cxr_core``: see cxr_core/cli.py."""
from cxr_core.cli import main

raise SystemExit(main())
