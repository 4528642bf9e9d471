from gptfast.cli import main

raise SystemExit(main())
