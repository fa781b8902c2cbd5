"""A handler module with a script's code and no `if __name__ == '__main__':` guard."""

import sys


def handle(conn: object) -> None:
    pass


sys.exit(3)
