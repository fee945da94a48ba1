"""Errors a user can see. Each says what is wrong and where; none is a traceback."""


class PodnetError(Exception):
    """Base of every error podnet reports to a user as one line."""


class ValidationError(PodnetError):
    """An object or manifest that does not follow the schema.

    `where` names the file, document index and object; `field` the dotted path.
    """

    def __init__(self, message: str, *, where: str = "", field: str = ""):
        self.where = where
        self.field = field
        self.detail = message
        parts = [p for p in (where, f"field {field}" if field else "") if p]
        super().__init__(f"{': '.join(parts)}: {message}" if parts else message)
