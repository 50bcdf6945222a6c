"""What one operator pass reads from storage, on the loopback S3 server.

    python bench/operator_storage.py [--passes 50]

For the tiny example's six stages, with stage k running (stages before it committed, each
output a few files), one pass's storage read is timed and its S3 requests counted in the two
ways the operator can make it: `whole` (every stage's output, final/, the running stage's
progress and checkpoints: what each pass read before, and what a pass still reads after a
Job ended, on a resource's first pass and once a minute) and `changed` (only what can have
changed since the last pass: the running stage). Printed side by side with their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).parent.parent / "operator"))

from amber import commits
from amber.plan import OUTPUT, plan
from amber.resource import parse
from amber.storage import open_store
from amber_operator.observe import Seen, storage
from trainer_helpers import moto_server, tiny_resource


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=50)
    args = parser.parse_args()
    proc, url = moto_server()
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        import boto3

        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=bucket)
        runs = plan(parse(tiny_resource(f"s3://{bucket}/runs", name="bench")))
        store = open_store(runs[0].run_uri)
        requests = []
        store.client.meta.events.register("before-call.s3", lambda **kw: requests.append(1))
        files = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-output-{os.getpid()}"
        files.mkdir(exist_ok=True)
        for name in ("model.safetensors", "config.json", "metrics.json"):
            (files / name).write_bytes(os.urandom(4096))

        print(
            f"{'running stage':<16} {'whole: req':>10} {'ms':>7} {'changed: req':>13} {'ms':>7}"
            f" {'ratio (ms)':>11}"
        )
        for k, run in enumerate(runs):
            if k:  # the stage before this one commits (a few files, marker last)
                commits.commit(
                    store, f"{runs[k - 1].stage.name}/{OUTPUT}", files, 1, {}, runs[k - 1].spec_hash
                )
            store.write_text(f"{run.stage.name}/progress.json", '{"step": 1, "total": 10}')
            row = []
            before = None
            for whole in (True, False):
                times, counts = [], []
                for _ in range(args.passes):
                    requests.clear()
                    start = time.perf_counter()
                    seen = storage(store, runs, before, whole)
                    times.append(time.perf_counter() - start)
                    counts.append(len(requests))
                    if before is None:
                        before = Seen(
                            seen["committed"],
                            seen["final_committed"],
                            frozenset(),
                            frozenset(),
                            0.0,
                        )
                row.append((statistics.median(counts), statistics.median(times) * 1e3))
            (wr, wms), (cr, cms) = row
            print(
                f"{run.stage.name:<16} {wr:>10.0f} {wms:>7.1f} {cr:>13.0f} {cms:>7.1f}"
                f" {wms / cms:>10.1f}x"
            )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
