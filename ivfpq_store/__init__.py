"""ivfpq-store: an embeddable, disk-backed IVF-PQ vector index.

>>> import ivfpq_store
>>> with ivfpq_store.create("vectors.ivfpq", xt, nlist=100, m=16) as store:  # doctest: +SKIP
...     store.add(xb)
...     distances, ids = store.search(xq, k=10, nprobe=8)
"""

from __future__ import annotations

from ._kernel import kernel_status as scan_backend
from .compaction import CompactReport
from .copying import CopyReport
from .creation import create, from_faiss, from_faiss_file
from .errors import (
    BadMagicError,
    CatalogBusyError,
    CatalogError,
    CatalogFullError,
    ChecksumError,
    CorruptStoreError,
    DimensionMismatchError,
    DiskFullError,
    DuplicateIdError,
    EmptyProbeWarning,
    FormatError,
    InvalidInputError,
    InvalidParamsError,
    IvfpqError,
    IvfpqWarning,
    ListFullError,
    ReadOnlyStoreError,
    ShardMismatchError,
    ShardUnavailableError,
    StaleSnapshotError,
    StoreClosedError,
    StoreExistsError,
    StoreLockedError,
    StoreNotFoundError,
    TrainingError,
    TruncatedFileError,
    UnknownIdError,
    UnsupportedVersionError,
    WrongProcessError,
)
from .filters import Filter
from .opening import open
from .params import IndexParams
from .rebalancing import RebalanceReport
from .reports import ListInfo, StoreInfo
from .retraining import RetrainReport
from .search import RangeResult, SearchPlan, SearchResult
from .store import Store
from .types import Metric
from .upgrading import UpgradeReport
from .verify import Problem, VerifyReport
from .version import package_version

__version__ = package_version()

__all__ = [
    "BadMagicError",
    "CatalogBusyError",
    "CatalogError",
    "CatalogFullError",
    "ChecksumError",
    "CompactReport",
    "CopyReport",
    "CorruptStoreError",
    "DimensionMismatchError",
    "DiskFullError",
    "DuplicateIdError",
    "EmptyProbeWarning",
    "Filter",
    "FormatError",
    "IndexParams",
    "InvalidInputError",
    "InvalidParamsError",
    "IvfpqError",
    "IvfpqWarning",
    "ListFullError",
    "ListInfo",
    "Metric",
    "Problem",
    "RangeResult",
    "ReadOnlyStoreError",
    "RebalanceReport",
    "RetrainReport",
    "SearchPlan",
    "SearchResult",
    "ShardMismatchError",
    "ShardUnavailableError",
    "StaleSnapshotError",
    "Store",
    "StoreClosedError",
    "StoreExistsError",
    "StoreInfo",
    "StoreLockedError",
    "StoreNotFoundError",
    "TrainingError",
    "TruncatedFileError",
    "UnknownIdError",
    "UnsupportedVersionError",
    "UpgradeReport",
    "VerifyReport",
    "WrongProcessError",
    "__version__",
    "create",
    "from_faiss",
    "from_faiss_file",
    "open",
    "scan_backend",
]
