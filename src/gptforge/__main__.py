"""`python -m gptforge ...` is the same as the `gptforge` console script (and what torchrun runs)."""

from gptforge.cli import main

if __name__ == "__main__":
    main()
