from babelhub.hub.cli import main

raise SystemExit(main())
