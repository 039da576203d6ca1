"""The lake as SQL: DuckDB views over one committed snapshot.

>>> from catalog import open_lake
>>> with open_lake("lake") as cat:
...     cat.df("SELECT Modality, count(*) FROM studies GROUP BY 1")
"""

from catalog import reports
from catalog.config import CatalogConfig
from catalog.connect import Catalog, open_lake
from catalog.errors import QueryError, ReportError

__all__ = ["Catalog", "CatalogConfig", "QueryError", "ReportError", "open_lake", "reports"]
