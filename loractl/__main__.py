"""`python -m loractl`."""

from .cli import main

main()
