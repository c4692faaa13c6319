"""``python -m tbn_ray``: the same as the ``tbn-ray`` command."""

from .cli import main

main()
