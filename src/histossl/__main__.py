from histossl.cli import main

raise SystemExit(main())
