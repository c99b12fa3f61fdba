"""``python -m gptq_core ...`` is the ``gptq`` command (for environments without the script)."""

from gptq_core.cli.main import main

raise SystemExit(main())
