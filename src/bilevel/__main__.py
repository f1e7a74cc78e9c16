"""`python -m bilevel ...`: the command line, which is the application's (`bilevel.app.cli`).

Not part of the engine: `import bilevel` never runs this module, so importing the application
here keeps the engine free of it.
"""

import sys


def main() -> int | None:
    """Run the `bilevel` command line with the process's arguments.

    Returns:
        The exit status for `sys.exit` (click exits by itself in standalone mode).
    """
    from bilevel.app.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
