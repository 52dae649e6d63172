"""Backends run the same stages on this machine (`local`) or on AWS SageMaker (`sagemaker`).

bincount.cli.COMMANDS names, per command, the function each backend runs; a test checks that every
row resolves and that a command's functions take the same parameters on both backends.

local/      train.py (container/train.py in a subprocess), tune.py (Optuna trials of it),
            endpoint.py (`bincount serve` in the background: deploy, undeploy)
sagemaker/  one module per AWS resource: training.py, tuning.py, estimator.py (the PyTorch estimator
            both use), endpoint.py (deploy, undeploy, predict), runtime.py (InvokeEndpoint),
            transform.py (the Batch Transform audit), processing.py (the shard job), debugger.py
            (rules, profiler report), jobs.py (what every job shares; stop), cleanup.py
tuning.py   the tuning result and record both backends share
"""
