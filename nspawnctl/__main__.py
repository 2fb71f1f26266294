from nspawnctl.cli import main

raise SystemExit(main())
