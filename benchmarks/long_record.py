"""Peak memory of validating a file that holds one over-long record (50 MB of text by default).

    .venv/bin/python benchmarks/long_record.py [--megabytes 50] [--max-length 4096]

`python -m data_tools validate` runs in a child process on a JSONL file of a few normal chats and one chat whose
answer is MEGABYTES of text; the child's peak RSS (VmHWM: ru_maxrss would carry the parent's peak across fork + exec)
and time are printed, and the same for the file
without the long record as the baseline. The long record must be refused (too_long) without being tokenized whole.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def validate(path: Path, max_length: int) -> tuple[float, float, str]:
    """Seconds, peak RSS in GB and the last output line of validating `path` in a fresh process."""
    code = (
        "import sys; from data_tools.cli import main; rc = main(sys.argv[1:]); "
        "print('peak_kb', next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:'))); "
        "sys.exit(rc)"
    )
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", code, "validate", str(path), "--max-length", str(max_length)],
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    peak = next(int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("peak_kb"))
    message = [line for line in (result.stderr + result.stdout).splitlines() if "too_long" in line or "sample" in line]
    return seconds, peak / 2**20, (message[-1] if message else "")[:160]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--megabytes", type=int, default=50)
    parser.add_argument("--max-length", type=int, default=4096)
    options = parser.parse_args()
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    long = {
        "messages": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": "word " * (options.megabytes * 2**20 // 5)},
        ]
    }
    with tempfile.TemporaryDirectory() as folder:
        base, path = Path(folder) / "base.jsonl", Path(folder) / "long.jsonl"
        base.write_text((json.dumps(chat) + "\n") * 10)
        path.write_text((json.dumps(chat) + "\n") * 10 + json.dumps(long) + "\n")
        base_s, base_gb, _ = validate(base, options.max_length)
        long_s, long_gb, message = validate(path, options.max_length)
    print(f"baseline (10 chats): {base_s:.1f}s, peak RSS {base_gb:.2f} GB")
    print(f"with one {options.megabytes} MB record: {long_s:.1f}s, peak RSS {long_gb:.2f} GB (target < 2 GB)")
    print(f"reported: {message}")


if __name__ == "__main__":
    main()
