"""How a suite names its members' run directories: ``<role>_<size>[-seed<N>]``, and which native role
a cross member starts from. The suite (ettin.cluster.suite_members) lays members out by these names and the
suite report (ettin.report.suite_report) finds them by them, so both read this one rule."""

from __future__ import annotations

from typing import Optional

# A cross member's role -> the native role whose final weights it starts from.
BASE = {"encoder_from_decoder": "decoder", "decoder_from_encoder": "encoder"}


def member_name(role: str, size: str, seed: Optional[int] = None) -> str:
    """``<role>_<size>``, with ``-seed<N>`` when the suite trains several seeds (seeds=N)."""
    return f"{role}_{size}" + (f"-seed{seed}" if seed is not None else "")
