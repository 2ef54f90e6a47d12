"""``python -m kproxy``."""

from __future__ import annotations

from kproxy.commands import main

raise SystemExit(main())
