"""``python -m prime_ckpt.cli``: runs :func:`prime_ckpt.cli.main` (importing this module runs nothing)."""

from prime_ckpt.cli import main

if __name__ == "__main__":
    main()
