"""``python -m prime_ckpt.cli``: runs :func:`prime_ckpt.cli.main`."""

from prime_ckpt.cli import main

main()
