"""`python -m bilevel ...` and the `bilevel` script: the application's command line.

Not part of the engine: `import bilevel` never runs this module. Without the `experiments`
extra, both entries say in one line what to install instead of failing on an import.
"""

import sys


def main() -> int | None:
    """Run the `bilevel` command line (`bilevel.app.cli`) with the process's arguments.

    Returns:
        2 when the `experiments` extra is not installed (after one line on stderr naming what
        is missing and how to install it); otherwise click exits by itself (standalone mode).
    """
    from bilevel.app import INSTALL_HINT, missing_requirements

    missing = missing_requirements()
    if missing:
        print(
            f"bilevel: the command line needs the experiments extra "
            f"(missing: {', '.join(missing)}); install it with: {INSTALL_HINT}",
            file=sys.stderr,
        )
        return 2
    from bilevel.app.cli import main as cli

    return cli()


if __name__ == "__main__":
    sys.exit(main())
