"""Numbers in text and markdown tables, formatted one way everywhere (reports, comparisons)."""


def format_value(value) -> str:
    """A metric for a table: floats to 4 significant digits, "-" when missing, else ``str``."""
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
