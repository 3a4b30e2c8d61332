"""scripts/bench: the import (issue 3) and write (issue 4) benchmarks, as one command."""
