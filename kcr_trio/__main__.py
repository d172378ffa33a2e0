from kcr_trio.cli import main

raise SystemExit(main())
