from fedct.cli import main

raise SystemExit(main())
