from cutegpt.cli import main

raise SystemExit(main())
