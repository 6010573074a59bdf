from kakuremichi.cli import main

raise SystemExit(main())
