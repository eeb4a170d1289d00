"""Feast's online store on the write/read path of the online state, measured in Feast's own
venv (bench/.venv-feast: its pins differ from ours). Run by bench/events.py; prints JSON.

    <feast venv>/bin/python bench/feast_probe.py --backend sqlite --dir TMP [--redis HOST:PORT]

What is measured is what this path would ask of Feast: `write_to_online_store` of rows
(user_id -> recent items as an Array(String), their times, the last type), 100 rows a call
and 1 row a call, and `get_online_features` for one user. Feast keeps the latest value per
entity key: it has no append, no id de-duplication and no journal, so an event path on Feast
would read, merge and write back each user's list (not measured: the write alone is the
floor of that cost).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd


def percentiles(samples: list[float]) -> dict[str, float]:
    arr = np.asarray(samples) * 1000
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)), "n": len(samples)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", choices=["sqlite", "redis"], required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--redis", default="127.0.0.1:6379")
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    from feast import Entity, FeatureStore, FeatureView, Field, FileSource, RepoConfig
    from feast.types import Array, Float64, String, ValueType

    args.dir.mkdir(parents=True, exist_ok=True)
    if args.backend == "sqlite":
        from feast.infra.online_stores.sqlite import SqliteOnlineStoreConfig

        online = SqliteOnlineStoreConfig(path=str(args.dir / "online.db"))
    else:
        from feast.infra.online_stores.redis import RedisOnlineStoreConfig

        online = RedisOnlineStoreConfig(connection_string=args.redis)
    config = RepoConfig(project="bench", registry=str(args.dir / "registry.db"), provider="local",
                        online_store=online, entity_key_serialization_version=3, repo_path=str(args.dir))  # fmt: skip
    store = FeatureStore(config=config)
    now = datetime.now(UTC)
    source_path = args.dir / "source.parquet"
    pd.DataFrame({"user_id": ["u0"], "items": [["i0"]], "times": [[0.0]], "last_type": ["view"],
                  "event_timestamp": [now]}).to_parquet(source_path)  # fmt: skip
    user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING)
    view = FeatureView(
        name="recent", entities=[user], ttl=timedelta(days=30), online=True,
        schema=[Field(name="items", dtype=Array(String)), Field(name="times", dtype=Array(Float64)),
                Field(name="last_type", dtype=String)],
        source=FileSource(path=str(source_path), timestamp_field="event_timestamp"),
    )  # fmt: skip
    store.apply([user, view])

    rng = np.random.default_rng(0)
    n_users = 10_000

    def rows(n: int) -> pd.DataFrame:
        users = rng.integers(0, n_users, n)
        return pd.DataFrame({
            "user_id": [f"u{u}" for u in users],
            "items": [[f"i{j}" for j in rng.integers(0, 5000, 20)] for _ in range(n)],
            "times": [list(rng.random(20) * 1e9) for _ in range(n)],
            "last_type": ["click"] * n, "event_timestamp": [datetime.now(UTC)] * n,
        })  # fmt: skip

    out: dict[str, object] = {"backend": args.backend, "feast": __import__("feast").__version__}
    # Populate every user once, so that reads find rows.
    for start in range(0, n_users, 1000):
        frame = rows(1000)
        frame["user_id"] = [f"u{u}" for u in range(start, start + 1000)]
        store.write_to_online_store("recent", frame)
    for batch in (100, 1):
        lat: list[float] = []
        frames = [rows(batch) for _ in range(200)]
        deadline = time.perf_counter() + args.seconds
        i = 0
        while time.perf_counter() < deadline:
            t = time.perf_counter()
            store.write_to_online_store("recent", frames[i % len(frames)])
            lat.append(time.perf_counter() - t)
            i += 1
        out[f"write_{batch}"] = {**percentiles(lat), "rows_per_s": batch * len(lat) / sum(lat)}
    lat = []
    features = ["recent:items", "recent:times", "recent:last_type"]
    check = store.get_online_features(features=features, entity_rows=[{"user_id": "u7"}]).to_dict()
    # A read that found nothing would be fast and meaningless.
    assert check["items"][0] and len(check["items"][0]) == 20, check
    deadline = time.perf_counter() + args.seconds
    while time.perf_counter() < deadline:
        t = time.perf_counter()
        result = store.get_online_features(features=features, entity_rows=[{"user_id": f"u{rng.integers(0, n_users)}"}])
        result.to_dict()
        lat.append(time.perf_counter() - t)
    out["read_1"] = percentiles(lat)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
