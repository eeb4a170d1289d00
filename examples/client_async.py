"""Recommendations for several users at once with BentoML's asynchronous client.

    python examples/client_async.py [URL] [USER_ID ...]     (default: http://127.0.0.1:3000 u1 u2 u3)
"""

from __future__ import annotations

import asyncio
import sys

import bentoml


async def main(url: str, user_ids: list[str]) -> None:
    async with bentoml.AsyncHTTPClient(url) as client:
        results = await asyncio.gather(*(client.recommend(user_id=u, k=3) for u in user_ids))
    for user_id, rec in zip(user_ids, results):
        titles = ", ".join(item["title"] for item in rec["items"])
        print(f"{user_id}: {titles}{'  (fallback)' if rec['fallback'] else ''}")


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0] if args else "http://127.0.0.1:3000", args[1:] or ["u1", "u2", "u3"]))
