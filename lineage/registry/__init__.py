"""A persistent fingerprint registry: register models once, find any model's relatives in under a second.

* :mod:`~lineage.registry.store` — the SQLite database (fingerprints, references, claims, cached tests);
* :mod:`~lineage.registry.keys` — transform-invariant retrieval keys derived from fingerprints;
* :mod:`~lineage.registry.ann` — the nearest-neighbour index of the keys;
* :mod:`~lineage.registry.reference` / :mod:`~lineage.registry.claims` — what identifies a model, what it claims;
* :mod:`~lineage.registry.ingest` / :mod:`~lineage.registry.search` / :mod:`~lineage.registry.query` —
  registering, shortlisting and confirming, and ``lineage registry query``.
"""

from lineage.registry.claims import ClaimCheck
from lineage.registry.ingest import Ingested, add, ingest
from lineage.registry.keys import KEY_DIM, retrieval_key
from lineage.registry.query import QueryResult, query
from lineage.registry.search import CandidatePolicy
from lineage.registry.shortlist import QueryPolicy
from lineage.registry.store import CacheEntryError, ModelRecord, Registry, default_db_path

__all__ = ["KEY_DIM", "CacheEntryError", "CandidatePolicy", "ClaimCheck", "Ingested", "ModelRecord", "QueryPolicy", "QueryResult",
           "Registry", "add", "default_db_path", "ingest", "query", "retrieval_key"]
