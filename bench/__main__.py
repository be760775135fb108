"""``python -m bench``: see bench/__init__.py."""
import sys

if sys.argv[1:2] == ["coldstart"]:  # the fast path's cold start, each run in a new process (bench/coldstart.py)
    from .coldstart import main as coldstart

    sys.exit(coldstart(sys.argv[2:]))
if sys.argv[1:2] == ["models"]:  # SDXL, SD3 and Flux at full size, one side per process (bench/models.py)
    from .models import main as models

    sys.exit(models(sys.argv[2:]))
if sys.argv[1:2] == ["profile"]:  # the compiled fast path's kernels by class (bench/profile.py)
    from .profile import main as profile

    sys.exit(profile(sys.argv[2:]))
from .pipeline import main  # noqa: E402

sys.exit(main())
