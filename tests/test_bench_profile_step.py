"""bench/profile_step.py: the host profile of a training step (its --host mode)."""

from __future__ import annotations

from bench import profile_step


def test_host_profile_names_the_case_and_lists_the_step_functions():
    text = profile_step.profile_host(
        "transformer/rotary_qk", "tiny", "fp32", "reference", steps=2, rows=40
    )
    header, _, table = text.partition("\n")
    assert header.startswith("== transformer/rotary_qk tiny fp32 train_step, reference: ")
    assert "ms/step wall under cProfile" in header
    # the step's own work is in the profile: its backward
    assert "run_backward" in table
    assert "Ordered by: internal time" in table
