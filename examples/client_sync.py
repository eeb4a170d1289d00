"""Recommendations with BentoML's synchronous client.

    python examples/client_sync.py [URL] [USER_ID]     (default: http://127.0.0.1:3000 u1)
"""

from __future__ import annotations

import sys

import bentoml


def main(url: str = "http://127.0.0.1:3000", user_id: str = "u1") -> None:
    with bentoml.SyncHTTPClient(url) as client:
        rec = client.recommend(user_id=user_id, k=5)
        print(f"model {rec['model_tag']}  fallback={rec['fallback']}")
        for item in rec["items"]:
            print(f"{item['rank']:>3}. {item['item_id']:<8} {item['title']}  score={item['score']}")
        # Re-rank the same items given in reverse order: the ranker puts them back.
        ids = [item["item_id"] for item in rec["items"]][::-1]
        ranked = client.rank(user_id=user_id, item_ids=ids)
        print("rank:", [item["item_id"] for item in ranked["items"]])


if __name__ == "__main__":
    main(*sys.argv[1:3])
