"""A handler module that prints as it is imported."""

print("HELLO FROM IMPORT")


def handle(conn: object) -> None:
    pass
