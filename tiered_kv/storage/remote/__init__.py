"""The remote tier's storage engine: KV blocks shared across serving nodes through Redis (or Redis Cluster).

:class:`RemoteStore` stores each block as ONE Redis string value under
``tkv:<namespace>:<model fingerprint>:<sequence hash hex>``: a 48-byte header (magic, format version, hash
algorithm, size of the token ids, digest of fingerprint + namespace + algorithm, key tag, size, xxh3-64 of what
follows), the block's token ids when its writer knew them (a match with ``tokens=`` compares them: a hash
collision is a miss), then the block's raw bytes (see :mod:`tiered_kv.storage.remote._format`). Every read checks
the header and the checksum; anything that does not match is a miss, counted, and deleted. There is no eviction
policy here: Redis's own ``maxmemory`` policy decides what stays. Requests are pipelined and grouped per cluster
node with bounded timeouts; a slow or dead node makes its keys misses (reads) or dropped writes, never a stall or
an exception (see :mod:`tiered_kv.storage.remote._cluster`).

Redis settings to use (``redis.conf`` or ``redis-server --option value``)::

    maxmemory 64gb                    # the remote tier's capacity: size it to the RAM you give Redis
    maxmemory-policy allkeys-lru      # or allkeys-lfu (keeps hot shared prefixes better under scans);
                                      # NOT noeviction: full memory then fails every write (counted as
                                      # put_failures) instead of evicting cold blocks
    save ""                           # no RDB snapshots: the tier is a cache, losing it costs recompute only
    appendonly no                     # no AOF (enable both only if blocks must survive a Redis restart)
    proto-max-bulk-len 512mb          # default; must exceed the block size + 48 bytes + 4 per token
    client-output-buffer-limit normal 0 0 0   # default; pipelined GETs of large blocks need unlimited
    # Redis Cluster, on every node:
    cluster-enabled yes
    cluster-config-file nodes-<port>.conf
    cluster-node-timeout 5000         # how fast a dead master is detected (and a replica promoted)
    cluster-require-full-coverage no  # a dead master without replica must not make the others refuse
                                      # their own keys (CLUSTERDOWN); its keys are simply misses
    cluster-allow-reads-when-down yes # optional: keep serving reads while the cluster state is "fail"
    # Security:
    requirepass ... / ACL users       # pass username=/password= to RemoteStore
    tls-port 6380, tls-cert-file, tls-key-file, tls-ca-cert-file   # then use rediss:// or ssl=True

One namespace per model revision or tenant keeps blocks apart (the namespace and the fingerprint are in every
key and every header); ACL key patterns such as ``~tkv:tenant-a:*`` can enforce that on the server side.
"""

from __future__ import annotations

from ...errors import RemoteTierError  # defined with the other errors; importable from here as before
from ._format import FORMAT_VERSION, HEADER_SIZE
from .store import RemoteStore

__all__ = ["FORMAT_VERSION", "HEADER_SIZE", "RemoteStore", "RemoteTierError"]
