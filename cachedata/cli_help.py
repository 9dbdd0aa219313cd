"""The command line's help texts: the epilog of ``cachedata --help`` and, per command, its
summary and an example epilog (kept apart from ``cli`` so that the code reads on its own)."""

from __future__ import annotations

EXIT_CODES = """\
exit status:
  0  success
  1  failure: corrupt items found (verify), a namespace could not be merged or deleted,
     an I/O error
  2  usage error: unknown option, bad size or duration, a PATH that does not exist,
     an unknown --namespace, clear without --yes when stdin is not a terminal
"""

MAIN_EPILOG = (
    """\
examples:
  cachedata info ~/.cache/cachedata
  cachedata verify /data/cache && cachedata merge /data/cache
  cachedata prune /data/cache --older-than 30d --max-bytes 500G

PATH is a cache_dir (the folder given to CachedDataset) or one namespace folder in it;
where it is optional it defaults to $CACHEDATA_HOME, else ~/.cache/cachedata.

sizes:      50G, 512M, 1.5T, 100KB, 4096: K, M, G, T, P (and KiB, MiB, ...) are powers of
            1024 as in `du -h`; KB, MB, GB, ... are powers of 1000; no unit: bytes
durations:  7d, 12h, 30m, 45s, 1d12h: units s, m, h, d, w; every number needs a unit

"""
    + EXIT_CODES
)

COMMANDS: dict[str, tuple[str, str]] = {
    "info": (
        "list namespaces: items, size, files, fingerprint, what produced them, when used",
        """\
example:
  cachedata info ~/.cache/cachedata
  cachedata info ~/.cache/cachedata --items --json | jq '.namespaces[].items'
  cachedata info ~/.cache/cachedata --namespace 3f2a9c --verbose

Reads meta.json, file names and sizes, lease files and the row count each data file
records in an extended attribute (user.cachedata.rows), so it answers at once. ITEMS is
then the rows stored, which equal the distinct items except for items two jobs computed
at the same time, until the next merge; --items counts the distinct items through every
file's index (slower), as info does for a namespace whose files lack the attribute (a
filesystem without user xattrs); --json says which in "items_counted" ("rows" or
"index"). --verbose (or --namespace) counts distinct items and adds a block per namespace
with the full transform repr, library versions and what differs from its nearest sibling
of the same dataset type (why a new namespace was made: attribute paths, version=, key=,
on-disk format). Last used is the mtime of the namespace's last_used file (touched at
most hourly), else of its meta.json.
""",
    ),
    "verify": (
        "re-read every item and check its checksum; exit 1 listing the bad keys",
        """\
example:
  cachedata verify ~/.cache/cachedata
  cachedata verify ~/.cache/cachedata --namespace 3f2a9c --json

Reads every item of every merged file and shard and compares it with its xxh3 checksum;
files that cannot be opened count as corrupt. Corrupt items are recomputed by the next
training run that needs them (or delete the namespace with `cachedata clear`). A file that
cannot be read now for lack of a resource (too many open files, no memory) is reported
as not checked, not as corrupt.
""",
    ),
    "merge": (
        "merge each namespace's shards into one file (safe while training reads)",
        """\
example:
  cachedata merge ~/.cache/cachedata
  cachedata merge ~/.cache/cachedata --namespace 3f2a9c --wait 5m

Takes the namespace's merge.lock (waits up to --wait for another merger), writes a new
merged file with every readable item, then removes the files it replaces; processes that
are reading keep their open files. Items failing their checksum are left out.
""",
    ),
    "clear": (
        "delete all namespaces under PATH, or one with --namespace",
        """\
example:
  cachedata clear ~/.cache/cachedata --namespace 3f2a9c
  cachedata clear /data/cache --yes

Asks for confirmation when stdin is a terminal (naming namespaces that a running job
uses); otherwise refuses (exit 2) unless --yes. A running job whose namespace is deleted
computes its items again. PATH is required here (no default) so that nothing is deleted
by accident.
""",
    ),
    "prune": (
        "remove namespaces unused for a while, or the least recently used over a size",
        """\
example:
  cachedata prune ~/.cache/cachedata --older-than 7d
  cachedata prune ~/.cache/cachedata --max-bytes 50G --dry-run
  cachedata prune ~/.cache/cachedata --older-than 30d --max-bytes 1.5T

--older-than removes namespaces not used for longer than the duration; --max-bytes then
removes the least recently used ones until the rest fits. Namespaces that a running job
uses (it holds a lease on them) or that are being merged right now are kept, and said so.
Does not ask for confirmation: try --dry-run first.
""",
    ),
    "budget": (
        "show the folder's disk budget and usage, or set the budget",
        """\
example:
  cachedata budget ~/.cache/cachedata
  cachedata budget ~/.cache/cachedata 50G
  cachedata budget ~/.cache/cachedata none
  cachedata budget /data/cache 1.5T --enforce --json

The budget is stored in the folder's cachedata-settings.json, which every process using
the folder reads (CachedDataset(max_bytes=) and $CACHEDATA_MAX_BYTES override it).
Training processes keep the folder under it themselves: when they create a namespace,
seal or merge, they evict the least recently used namespaces that no live process uses.
--enforce does that now. PATH is the cache folder (a namespace folder means its parent).
""",
    ),
}
