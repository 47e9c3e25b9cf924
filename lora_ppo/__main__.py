import sys

from lora_ppo.cli import main

sys.exit(main())
