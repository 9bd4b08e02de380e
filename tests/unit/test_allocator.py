"""Allocator tuning: applied once on glibc, switched off by DPIMAGES_KEEP_FREED_MEMORY=0."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

CHECK = "from dpimages.allocator import keep_freed_memory as k; print(k(), k())"


def _run(env_value: str | None) -> str:
    env = {"PATH": "/usr/bin:/bin"} | ({} if env_value is None else {"DPIMAGES_KEEP_FREED_MEMORY": env_value})
    return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, check=True,
                          env=env).stdout.strip()


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_on_glibc_and_its_switch() -> None:
    assert _run(None) == "True True"  # mallopt accepted both settings; the second call is a no-op
    assert _run("0") == "False False"
