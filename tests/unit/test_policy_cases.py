"""Every truth table in tests/policy_cases against the compiled state (walked as the
kernel walks it) and against the reference semantics, step by step."""

from pathlib import Path

import pytest
from tests.support.policy_cases import PODS, CaseWorld, load_cases, pod_ip, predicted

from podnet.policy.compiler import PolicyCompiler, compile_policy
from podnet.policy.model import InputCache

CASES = load_cases(Path(__file__).parent.parent / "policy_cases")


def test_there_are_cases_for_every_topic():
    names = {c.name for c in CASES}
    for required in ("deny-all-ingress", "deny-all-egress", "allow-from-namespace", "pod-and-namespace-and",
                     "pod-or-namespace-or", "named-port", "end-port-range", "ipblock-except",
                     "egress-through-service", "multiple-policies-union", "policy-update-and-delete"):
        assert required in names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_case(case):
    world = CaseWorld(case)
    incremental = PolicyCompiler()
    cache = InputCache()
    for i, step in enumerate(case.steps):
        world.step(step)
        inputs = cache.inputs(world.pods(), world.namespaces(), world.policy_list(), [pod_ip(p) for p in PODS])
        state = incremental.compile(inputs)
        assert state == compile_policy(inputs), f"step {i}: incremental and fresh compile differ"
        for probe in step.probes:
            for how in ("walk", "reference"):
                got = predicted(inputs, state, probe, how)
                diff = probe.expect.diff(got)
                assert not diff, (
                    f"{case.name} step {i} {probe.label} ({how}):\n" + "\n".join(diff)
                    + "\nexpected:\n" + probe.expect.format() + "\ngot:\n" + got.format()
                )
