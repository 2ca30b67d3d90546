"""``python -m adapter_fused``: parity and timing report of the fused adapter on this machine."""

from .report import main

raise SystemExit(main())
