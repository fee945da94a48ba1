import sys

from podnet.dns.server.cli import main

sys.exit(main())
