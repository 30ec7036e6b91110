"""Sum py-spy's collapsed stacks (`py-spy record --format raw`, as `e2e_bench.py --profile` writes them)
into where the hub's time goes: the share of samples in which each file, or each function, is on the
stack (inclusive), and the share each file spends itself (self time).

    python bench/profile_summary.py FILE [--top 40] [--match babelhub/]
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^():]+)(?::\d+)?\)$")


def frames(stack: str) -> list[tuple[str, str]]:
    """(file, function) of each frame of one collapsed stack, outermost first."""
    found = []
    for frame in stack.split(";"):
        match = _FRAME.match(frame)
        if match:
            found.append((match["file"], match["function"]))
        else:
            found.append((frame, frame))
    return found


def summarise(path: Path, top: int, match: str) -> None:
    inclusive_files: Counter[str] = Counter()
    inclusive_functions: Counter[str] = Counter()
    self_files: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        stack_frames = frames(stack)
        for file in {file for file, _ in stack_frames}:
            inclusive_files[file] += count
        for name in {f"{function} ({file})" for file, function in stack_frames}:
            inclusive_functions[name] += count
        if stack_frames:
            self_files[stack_frames[-1][0]] += count
    if not total:
        print("no samples")
        return

    def show(title: str, counter: Counter[str]) -> None:
        print(f"\n{title}")
        shown = [(name, count) for name, count in counter.most_common() if match in name][:top]
        for name, count in shown:
            print(f"  {count * 100 / total:5.1f}%  {name}")

    print(f"{total} samples")
    show("files on the stack (inclusive)", inclusive_files)
    show("functions on the stack (inclusive)", inclusive_functions)
    show("self time by file", self_files)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--match", default="", help="show only names containing this")
    options = parser.parse_args()
    summarise(options.file, options.top, options.match)


if __name__ == "__main__":
    main()
