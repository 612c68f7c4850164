from particlewatch.cli import main

raise SystemExit(main())
