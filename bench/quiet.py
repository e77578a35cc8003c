"""Waiting for a quiet machine before timing (the benchmark machines are shared)."""
import os
import time


def wait_quiet(max_load: float, timeout_s: float, indent: str = "") -> float:
  """Waits (up to timeout_s) until the 1-minute load average is below max_load; returns it (or
  the last one seen)."""
  deadline = time.time() + timeout_s
  load = os.getloadavg()[0]
  while load > max_load and time.time() < deadline:
    print(f"{indent}load {load:.2f} > {max_load}: waiting", flush=True)
    time.sleep(30)
    load = os.getloadavg()[0]
  return load
