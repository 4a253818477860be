import sys

from alexnet.cli import main

# Guarded: worker processes started with "spawn" (experiment --jobs, DataLoader workers)
# import this module as __mp_main__ and must not run the command again.
if __name__ == "__main__":
    sys.exit(main())
