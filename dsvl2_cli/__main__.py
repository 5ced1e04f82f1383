"""`python -m dsvl2 ...` is `dsvl2 ...`."""

from dsvl2.app import main

main()
