"""``python -m tbn_ray``: the same as the ``tbn-ray`` command."""

from tbn_ray.cli import main

main()
