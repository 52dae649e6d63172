"""The SageMaker backend, one module per AWS resource (SageMaker Python SDK v2, clients from bincount.aws).

training.py    `train`: a training job; its record, rule verdicts and profiler report
tuning.py      `tune`: a HyperparameterTuner; the best trial recorded
estimator.py   the PyTorch estimator both start: code, channels, weights, hyperparameters
endpoint.py    `deploy`, `undeploy`, `predict`: a PyTorchModel endpoint (real-time or serverless)
runtime.py     InvokeEndpoint (sagemaker-runtime)
transform.py   `audit`: a Batch Transform job joined into the audit report
processing.py  `shard`: a Processing job builds the shard channels bucket to bucket
debugger.py    the Debugger and profiler rules, their verdicts, the profiler report
jobs.py        what every job shares (the SDK session, one-line errors, names, tags, S3 locations) and `stop`
cleanup.py     `cleanup`: delete what bincount made on AWS
"""
