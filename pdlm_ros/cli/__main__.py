import sys

from pdlm_ros.cli import main

sys.exit(main())
