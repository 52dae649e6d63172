"""SageMaker Debugger and profiler: the built-in rules a training job runs, their verdicts, the profiler report.

The rules themselves (one table for both backends): bincount.debugger.RULES.
"""

from __future__ import annotations

import time
from typing import Any

from bincount.backends.sagemaker import jobs
from bincount.config import Settings
from bincount.debugger import Finding
from bincount.errors import BincountError
from bincount.workspace import Workspace


# Tensors the built-in rules read, saved through each rule's `collections_to_save` (one definition
# per collection, so the hook config the SDK merges from the rules has no conflicting duplicates).
# The rules themselves: bincount.debugger.RULES; relu_input's include_regex depends on the architecture
# (activation_inputs_regex).
COLLECTIONS = {
    "gradients": {"save_interval": "100"},
    "losses": {"save_interval": "20"},
    "relu_input": {"save_interval": "200"},
}


# The inputs of each architecture's activation modules, as smdebug names them ("<module name>_input_<i>",
# the module name from named_modules() of the model train.py registers). torchvision's ResNets call
# their ReLU modules "relu"; MobileNetV3 has unnamed activations (ReLU or Hardswish) as child 2 of
# each Conv2dNormActivation ("features.1.block.0.2", "features.12.2") and a Hardswish "classifier.1".
ACTIVATION_INPUTS = {
    "resnet": r".*relu_input",
    "mobilenet_v3": r"^(features\.\d+(\.block\.\d+)?\.2|classifier\.1)_input_\d+$",
}


def activation_inputs_regex(arch: str) -> str:
    """The regex for the tensors PoorWeightInitialization reads: the activation inputs of `arch`."""
    family = next((f for f in ACTIVATION_INPUTS if arch.startswith(f)), None)
    if family is None:
        raise BincountError(f"train.arch={arch!r}: no activation-input regex for PoorWeightInitialization; "
                            "switch the rule off with --set sagemaker.rules.poor_weight_initialization=false")
    return ACTIVATION_INPUTS[family]


def debugger_rules(settings: Settings) -> list[Any]:
    """The enabled built-in Debugger rules (collections via collections_to_save) and the ProfilerReport rule."""
    from sagemaker.debugger import CollectionConfig, ProfilerRule, Rule, rule_configs

    from bincount.debugger import RULES

    switches = settings.sagemaker.rules
    rules: list[Any] = []
    for field, (_, collections) in RULES.items():
        if not getattr(switches, field):
            continue
        actions = rule_configs.ActionList(rule_configs.StopTraining()) if switches.stop_training_on_failure else None
        parameters = None
        configs = []
        for name in collections:
            params = dict(COLLECTIONS[name])
            if name == "relu_input":
                params["include_regex"] = activation_inputs_regex(settings.train.arch)
                parameters = {"activation_inputs_regex": params["include_regex"]}
            configs.append(CollectionConfig(name=name, parameters=params))
        rules.append(Rule.sagemaker(getattr(rule_configs, field)(), rule_parameters=parameters,
                                    collections_to_save=configs, actions=actions))
    if switches.profiler_report:
        rules.append(ProfilerRule.sagemaker(rule_configs.ProfilerReport()))
    return rules


RULE_POLL_S = 20.0  # between DescribeTrainingJob calls while rule evaluations run


def pending_rules(description: dict[str, Any]) -> list[str]:
    """The rules whose evaluation is still InProgress."""
    return [r["rule"] for r in rule_statuses(description) if r["status"] == "InProgress"]


def wait_for_rules(client: Any, description: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """After the job ends: describe it until no rule evaluation is InProgress, for at most timeout_s.

    Rule evaluations run in their own processing jobs and finish minutes after the training job.
    Progress goes to stderr; Ctrl-C stops the waiting only (the job has ended, the rules go on).
    """
    from bincount.console import log

    job = description["TrainingJobName"]
    start = time.monotonic()
    try:
        while (pending := pending_rules(description)) and time.monotonic() - start < timeout_s:
            log(f"waiting for rule evaluations: {', '.join(pending)} ({time.monotonic() - start:.0f} s of at most "
                f"{timeout_s:.0f} s; Ctrl-C stops waiting)")
            time.sleep(RULE_POLL_S)
            description = client.describe_training_job(TrainingJobName=job)
    except KeyboardInterrupt:
        log("stopped waiting for the rule evaluations")
    if pending_rules(description):
        log(f"rules still evaluating: {', '.join(pending_rules(description))}; `bincount status` shows their "
            "verdicts and fetches the profiler report later")
    return description


def rule_statuses(description: dict[str, Any]) -> list[Finding]:
    """Debugger and profiler rule evaluation statuses from describe_training_job, as debugger findings."""
    rows: list[Finding] = []
    for key in ("DebugRuleEvaluationStatuses", "ProfilerRuleEvaluationStatuses"):
        for item in description.get(key) or []:
            rows.append({"rule": item.get("RuleConfigurationName", "?"), "status": item.get("RuleEvaluationStatus", "?"),
                         "detail": item.get("StatusDetails", ""), "source": "SageMaker"})
    return rows


def download_profiler_report(settings: Settings, s3: Any, description: dict[str, Any]) -> str | None:
    """Copy <output>/<job>/rule-output/ProfilerReport*/ to <workdir>/reports/profiler/<job>/; the folder or None.

    None while the ProfilerReport rule is still evaluating (its report is written when it ends).
    """
    from bincount.aws import parse_s3_uri

    if "ProfilerReport" in " ".join(pending_rules(description)):
        return None
    job = description["TrainingJobName"]
    base = (description.get("OutputDataConfig") or {}).get("S3OutputPath") or jobs.output_path(settings)
    bucket, prefix = parse_s3_uri(base.rstrip("/") + f"/{job}/rule-output/")
    target = Workspace(settings.workdir).reports / "profiler" / job
    found = False
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) + 1:]
            if not rel.startswith("ProfilerReport") or rel.endswith("/") or ".." in rel.split("/"):
                continue
            dest = target / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(dest))
            found = True
    return str(target) if found else None
