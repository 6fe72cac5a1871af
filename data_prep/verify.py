"""Check shard folders: the manifest is valid and every shard has its size and sha256.

    python -m data_prep.verify shards/ [more_shards/ ...] [--size-only] [--json]

Exits 0 when every folder is intact; otherwise prints the first bad file per folder and exits 1.
Reads every byte (unless --size-only): run it once after copying data to a cluster, not per rank.
"""

from __future__ import annotations

import argparse
import json

from tqdm.auto import tqdm

from data_prep.errors import DataPrepError, run_command
from dist_train.formats.manifest import SPLITS, check_shards, read_manifest


def verify_folder(folder: str, checksums: bool = True) -> dict:
    """The folder's token counts; raises `ManifestError` naming the first bad file."""
    manifest = read_manifest(folder)
    check_shards(folder, manifest, checksums=checksums)
    return {"folder": folder, **{f"{s}_tokens": manifest["splits"][s]["num_tokens"] for s in SPLITS},
            "shards": sum(len(manifest["splits"][s]["shards"]) for s in SPLITS)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", help="shard folders (holding manifest.json)")
    parser.add_argument("--size-only", action="store_true", help="check sizes, skip the sha256s")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)
    results, failed = [], False
    for folder in tqdm(args.folders, unit="folder", disable=len(args.folders) < 2):
        try:
            results.append({"ok": True, **verify_folder(folder, checksums=not args.size_only)})
        except DataPrepError as err:
            results.append({"folder": folder, "ok": False, "error": str(err)})
            failed = True
    for r in results:
        if args.json:
            print(json.dumps(r))
        elif r["ok"]:
            print(f"ok   {r['folder']}: {r['train_tokens']:,} train + {r['val_tokens']:,} val tokens "
                  f"in {r['shards']} shards")
        else:
            print(f"BAD  {r['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    run_command(main)
