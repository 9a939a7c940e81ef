"""Child process for the sharing test: ``remote_child.py read|write URL NAMESPACE TAG N``.

``read`` prints one JSON line ``{"hits", "equal", "misses"}``; ``write`` stores N blocks of stream TAG.
"""

from __future__ import annotations

import json
import sys

from remote_data import ALGO, MODEL, blocks_for, hashes, same

from tiered_kv.storage.remote import RemoteStore


def main() -> int:
    mode, url, namespace, tag, n = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
    hs = hashes(tag, n)
    with RemoteStore(url, model=MODEL, namespace=namespace, hash_algorithm=ALGO) as store:
        if mode == "write":
            written = store.put_blocks(hs, blocks_for(hs, MODEL))
            print(json.dumps({"written": written}))
            return 0 if written == n else 1
        out, ok = store.get_blocks(hs)
        expect = blocks_for(hs, MODEL)
        equal = sum(1 for i in range(n) if ok[i] and same(out[i], expect[i]))
        print(json.dumps({"hits": sum(ok), "equal": equal, "misses": n - sum(ok)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
