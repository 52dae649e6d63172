"""The local backend: the same stages as SageMaker, on this machine.

train.py    `bincount train`: container/train.py in a subprocess with SageMaker's environment
tune.py     `bincount tune`: Optuna trials of the same script
endpoint.py `bincount deploy` / `undeploy`: `bincount serve` in the background (the endpoint contract)
"""
