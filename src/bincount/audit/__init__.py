"""Audit recorded bin quantities against the model: which bins look miscounted, and which need a person.

Bins (--source; default the test split):
  a manifest: JSON Lines with "count" and "image" (relative to the workdir, absolute, or s3://);
  a folder or an s3:// prefix of images in the bucket layout: the expected quantity of
  bin-images/<id>.jpg is EXPECTED_QUANTITY in metadata/<id>.json (or <id>.json beside the image).
Scoring: with the sagemaker backend (and no --endpoint/--model) a Batch Transform job
(bincount.backends.sagemaker.transform); otherwise here (bincount.audit.local), by several worker
processes (audit.workers, one per core) each running the artifact's own handlers, or by concurrent
requests to an endpoint. Each result is appended to a partial file as it arrives; the partial file is named by the model and the input, so an
interrupted audit run again skips what is done, and a different model or input starts afresh. The
ranking is made at the end from that file (sorted runs on disk, merged), so memory stays flat.
Actions:
  ok          the model agrees with the record (confidence >= threshold)
  investigate the model disagrees and is confident: a likely inventory error, most confident first
  recount     the model's confidence is below the threshold: a person counts the bin instead
  error       the bin could not be scored (reason given); makes the exit code 1

Modules: core.py (bins, result records, the partial file, ranking, CSV, summary), local.py (the local
audit); the SageMaker one is bincount.backends.sagemaker.transform.
"""
