"""The lake as SQL: DuckDB views over one committed snapshot.

>>> from catalog import open_lake
>>> with open_lake("lake") as cat:
...     cat.df("SELECT Modality, count(*) FROM studies GROUP BY 1")
"""

from catalog.config import CatalogConfig
from catalog.connect import Catalog, open_lake
from catalog.errors import QueryError

__all__ = ["Catalog", "CatalogConfig", "QueryError", "open_lake"]
