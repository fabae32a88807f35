"""`python -m kondense_jobs.cleanup --prefix URI`: delete everything a pipeline published.

The operator runs this as a Job when a pipeline with spec.storage.deletionPolicy: Delete is
deleted; the pod gets the storage credentials from the pipeline's Secret, the operator never
does. Prints one summary line, writes it as the termination message, and exits with a code
from kondense.errors (15: access denied, 20: store unavailable, retried by the Job).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from kondense.api import Summary
from kondense.errors import BY_REASON, InvalidSpec, Reason
from kondense.store import S3Location, open_store
from kondense_jobs.__main__ import classify, write_termination

log = logging.getLogger("kondense_jobs.cleanup")


def check_prefix(prefix: str) -> None:
    """Refuse prefixes that could reach beyond one pipeline: a bucket root or a bare directory."""
    if prefix.startswith("s3://"):
        depth = len([p for p in S3Location.parse(prefix).key.split("/") if p])
    elif prefix.startswith("file://"):
        depth = len([p for p in prefix[len("file://"):].split("/") if p])
    else:
        raise InvalidSpec(f"--prefix {prefix}: expected s3://bucket/... or file:///...")
    if depth < 2:  # <storage>/<namespace>/<pipeline>: at least namespace and pipeline
        raise InvalidSpec(f"--prefix {prefix}: refusing to delete a prefix shallower than <namespace>/<pipeline>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kondense_jobs.cleanup", description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True, help="<storage>/<namespace>/<pipeline>")
    parser.add_argument("--endpoint", help="S3 endpoint URL (S3-compatible stores)")
    parser.add_argument("--region", help="S3 region")
    parser.add_argument("--termination-log", help="summary file (default $KONDENSE_TERMINATION_LOG)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("KONDENSE_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_prefix(args.prefix)
        deleted = open_store(args.prefix, args.endpoint, args.region).delete_prefix(args.prefix)
    except BaseException as exc:  # noqa: BLE001 - turned into a reason and an exit code
        reason, message = classify(exc)
        log.error("%s: %s", reason, message)
        write_termination(Summary(state="Failed", reason=reason, message=message), args.termination_log)
        return BY_REASON[reason].exit_code
    log.info("Deleted %d objects under %s", deleted, args.prefix)
    summary = Summary(state="Succeeded", reason=Reason.SUCCEEDED, message=f"deleted {deleted} objects under {args.prefix}",
                      metrics={"deleted_objects": deleted})
    write_termination(summary, args.termination_log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
