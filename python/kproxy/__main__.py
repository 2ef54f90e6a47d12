"""``python -m kproxy``."""

from __future__ import annotations

from kproxy.cli import main

raise SystemExit(main())
